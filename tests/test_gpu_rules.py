"""GPU-only rules checked on CPU (issue #29): where each colocated engine runs, the FP8 GEMMs' token
multiples of the micro-batches, and how a CUDA-IPC weight bucket is opened and released by a vLLM worker.
No GPU here: the placement is a pure function of what the ranks report, TransformerEngine's shape rule is
restated from its source (rlv_megatron/train/packing.py cites it), and torch.cuda is faked where the code
calls it."""

import contextlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from rlv_megatron.config import ConfigError, RolloutConfig
from rlv_megatron.rollout import placement, transport
from rlv_megatron.rollout.placement import Placement, RankGpu, colocated_gpu_ids
from tests.test_parallel_step import grouped_batch, synthetic_batch


# ---- item 5: each colocated engine on its replica's GPUs ---------------------------------------------------

def layout(tp: int, pp: int, dp: int, gpus_per_node: int = 8) -> list[RankGpu]:
    """What every rank of a torchrun job reports, in megatron's rank order (its RankGenerator), one rank per
    GPU, `gpus_per_node` ranks per node."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    tp_rank = {r: i for group in gen.get_ranks("tp") for i, r in enumerate(group)}
    pp_rank = {r: i for group in gen.get_ranks("pp") for i, r in enumerate(group)}
    owner = {r: min(group) for group in gen.get_ranks("tp-pp") for r in group}
    return [RankGpu(f"node{r // gpus_per_node}", r, r % gpus_per_node, owner[r], pp_rank[r], tp_rank[r])
            for r in range(tp * pp * dp)]


def engines(ranks: list[RankGpu], rollout_tp: int) -> dict[int, tuple[str, list[int]]]:
    owners = [r for r in ranks if r.rank == r.engine_rank]
    return {o.rank: (o.host, colocated_gpu_ids(ranks, o.rank, rollout_tp)) for o in owners}


def test_math_7b_engines_take_four_disjoint_pairs():
    """TP=2 x DP=4 on one 8-GPU node, rollout TP=2: each replica's engine on that replica's two GPUs."""
    assert engines(layout(tp=2, pp=1, dp=4), 2) == {0: ("node0", [0, 1]), 2: ("node0", [2, 3]),
                                                    4: ("node0", [4, 5]), 6: ("node0", [6, 7])}


def test_r1_32b_engines_take_their_node():
    """2 nodes x 8 GPUs, TP=8 x DP=2, rollout TP=8: one engine per node on all of its GPUs; at 4 nodes with
    PP=2 each engine runs on its replica's first stage, which fills its owner's node."""
    assert engines(layout(tp=8, pp=1, dp=2), 8) == {0: ("node0", list(range(8))), 8: ("node1", list(range(8)))}
    assert engines(layout(tp=8, pp=2, dp=2), 8) == {0: ("node0", list(range(8))), 8: ("node1", list(range(8)))}


def test_a_replica_lends_its_other_stages_and_never_another_replicas_gpus():
    # TP=1 x PP=2 x DP=4: a replica's stages are ranks d and d + 4; its engine takes both GPUs, owner's first
    assert engines(layout(tp=1, pp=2, dp=4), 2) == {d: ("node0", [d, d + 4]) for d in range(4)}
    # a rollout TP below the trainer's: the first GPUs of the replica
    assert engines(layout(tp=4, pp=1, dp=2), 2) == {0: ("node0", [0, 1]), 4: ("node0", [4, 5])}


def test_a_rollout_tp_the_replica_cannot_hold_is_refused_naming_the_fields():
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size=4: .* replica of rank 0 has 2 on node0 "
                                          r"\(its parallel.tp x parallel.pp ranks there\)"):
        engines(layout(tp=2, pp=1, dp=4), 4)
    # TP=8 over nodes of 4 GPUs: the owner's node holds 4 of the replica's 8 GPUs
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size=8: .* has 4 on node0"):
        engines(layout(tp=8, pp=1, dp=1, gpus_per_node=4), 8)


@pytest.fixture
def fake_node(monkeypatch):
    """torch.cuda of an 8-GPU node; the world's reports (placement._gather) set by the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(placement.socket, "gethostname", lambda: "node0")

    def world(ranks: list[RankGpu], rank: int):
        me = ranks[rank]
        monkeypatch.setattr(torch.cuda, "current_device", lambda: me.gpu)
        monkeypatch.setattr(placement.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(placement.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(placement, "_gather", lambda mine: (assert_same(mine, me), ranks)[1])
        return Placement(dp_rank=rank // 2, dp_size=4, tp_rank=me.tp_rank, pp_rank=me.pp_rank,
                         engine_rank=me.engine_rank)

    def assert_same(mine, me):
        assert mine == me  # what engine_devices reports of itself

    return world


@pytest.mark.parametrize("visible, expected", [(None, ["2", "3"]), ("GPU-a,GPU-b,GPU-c,GPU-d,GPU-e,GPU-f,GPU-g,GPU-h",
                                                                    ["GPU-c", "GPU-d"])])
def test_engine_devices_on_gpu_are_the_replicas_in_the_processs_own_terms(monkeypatch, fake_node, visible,
                                                                           expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)  # Slurm may name the node's GPUs by UUID
    ranks = layout(tp=2, pp=1, dp=4)
    assert placement.engine_devices(fake_node(ranks, 2), RolloutConfig(tensor_parallel_size=2)) == expected
    assert placement.engine_devices(fake_node(ranks, 3), RolloutConfig(tensor_parallel_size=2)) is None
    # a refusal stops every rank, not only the engine owners (no rank waits on a collective of one that left)
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size=4"):
        placement.engine_devices(fake_node(ranks, 3), RolloutConfig(tensor_parallel_size=4))


# ---- item 6: FP8 GEMMs' token dimension ----------------------------------------------------------------

def te_accepts(gemm_input_shape: tuple[int, ...], multiple: int) -> bool:
    """TransformerEngine's assert_dim_for_fp8_exec on the token dims (their product, here at the multiple
    the weight-gradient GEMM also needs: 16, MXFP8 32) and a hidden size that is a multiple of 16."""
    tokens = 1
    for d in gemm_input_shape[:-1]:
        tokens *= d
    return tokens % multiple == 0 and gemm_input_shape[-1] % 16 == 0


def gemm_inputs(R: int, S: int, tp: int, sp: bool, hidden: int = 64) -> list[tuple[int, ...]]:
    """The inputs of one layer's GEMMs on a TP rank for a micro-batch [R, S]: megatron's activations are
    [S, R, H]; column-parallel linears (QKV, FC1) take the rank's sequence shard under sequence parallel (TE
    checks it before its all-gather), row-parallel ones (proj, FC2) the whole sequence, H / TP wide."""
    return [(S // tp if sp else S, R, hidden), (S, R, hidden // tp)]


def test_fp8_token_multiples_follow_transformer_engine():
    from rlv_megatron.train.packing import fp8_token_multiple, seq_multiple

    assert fp8_token_multiple(None) == 1 and fp8_token_multiple("hybrid") == 16
    assert fp8_token_multiple("e4m3", "tensorwise") == 16 and fp8_token_multiple("hybrid", "mxfp8") == 32
    assert seq_multiple(2, False) == 1 and seq_multiple(4, True) == 4  # no FP8: as before
    assert seq_multiple(2, False, "hybrid") == 16 and seq_multiple(4, True, "hybrid") == 64
    assert seq_multiple(2, True, "e4m3", "mxfp8") == 64


@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True), (4, True)])
@pytest.mark.parametrize("recipe", ["delayed", "mxfp8"])
@pytest.mark.parametrize("batch, pack, share, budget, min_count", [
    ("synthetic", False, False, 64, 1),  # one right-padded sequence per row, rows of their own length
    ("synthetic", True, False, 64, 1),  # THD: one packed row per micro-batch
    ("synthetic", True, False, 100, 3),  # THD under a pipeline: one shape for all, a budget off the multiple
    ("grouped", True, True, 64, 1),  # shared prompts (local spec layout)
    ("synthetic", False, False, 48, 2),  # unpacked under a pipeline
])
def test_micro_batches_under_fp8_give_every_gemm_a_token_count_te_accepts(monkeypatch, tp, sp, recipe, batch,
                                                                       pack, share, budget, min_count):
    from megatron.core import parallel_state as ps

    from rlv_megatron.train.packing import fp8_token_multiple, micro_batches
    from rlv_megatron.train.step import Groups

    # Groups.current as the policy builds it (train/policy.py), in a TP group of `tp` ranks
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: tp)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: min_count)
    monkeypatch.setattr(ps, "get_data_parallel_group", lambda: None)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_group", lambda: None)
    groups = Groups.current(sp, "hybrid", recipe)
    b = synthetic_batch() if batch == "synthetic" else grouped_batch()
    cfg = SimpleNamespace(micro_batch_tokens=budget, pack=pack, share_prompts=share)
    mbs = micro_batches(b, {"target": b.targets}, cfg, groups.seq_multiple, min_count=groups.pp_size)
    multiple = fp8_token_multiple("hybrid", recipe)
    assert sorted(int(i) for mb in mbs for i in mb.seq.unique() if i >= 0) == list(range(len(b)))
    for mb in mbs:
        R, S = mb.tokens.shape
        assert not sp or S % tp == 0
        for shape in gemm_inputs(R, S, tp, sp):
            assert te_accepts(shape, multiple), (R, S, shape)
        if mb.cu_seqlens is not None:
            assert int(mb.cu_seqlens[-1]) == S  # THD: the padding to the multiple is covered


def test_without_fp8_nothing_changes():
    from rlv_megatron.train.step import Groups

    assert Groups.current().seq_multiple == 1 and Groups.current(True).seq_multiple == 1  # no model parallel
    assert Groups.current(False, "hybrid").seq_multiple == 16


# ---- item 10: the CUDA-IPC bucket, opened where it was sent from and released only once read --------------

def _handle(uuid: str, sender_index: int = 0) -> dict:
    args = (torch.Tensor, torch.Size([64]), (1,), 0, torch.UntypedStorage, torch.uint8, sender_index, b"h", 64,
            0, False, b"ref", 0, b"event", True)
    return {"kind": "cuda_ipc", "args": transport.encode_ipc_args(args), "device_uuid": uuid}


def test_an_ipc_buffer_opens_on_the_gpu_it_was_sent_from(monkeypatch):
    import torch.multiprocessing.reductions as reductions

    # the trainer (its cuda:0) sent from GPU-c; this worker (CUDA_VISIBLE_DEVICES=c,d under rollout TP=2,
    # as rank 1: its current device is 1) sees GPU-c as its cuda:0
    assert transport.ipc_device_index(_handle("GPU-c"), ["GPU-c", "GPU-d"]) == 0
    assert transport.ipc_device_index(_handle("GPU-d", sender_index=1), ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]) == 3
    with pytest.raises(RuntimeError, match="lives on GPU GPU-a, which this engine worker cannot see .* "
                                           "use rollout.transport=shm"):
        transport.ipc_device_index(_handle("GPU-a"), ["GPU-c", "GPU-d"])
    opened = {}
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *args: opened.setdefault("device", args[6]))
    monkeypatch.setattr(transport, "visible_gpu_uuids", lambda: ["GPU-d", "GPU-c"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    transport.open_cuda_ipc(_handle("GPU-c", sender_index=0))
    assert opened["device"] == 1  # where GPU-c is in this process, not the sender's index or the current device


class _FakeWorker:
    """A vLLM worker's parts that WeightSyncExtension uses."""
    vllm_config = None

    def __init__(self, log):
        self.log = log
        model = SimpleNamespace(load_weights=lambda weights: (log.append("load"), [n for n, _ in weights])[1],
                                named_parameters=lambda: iter(()), modules=lambda: iter(()))
        self.model_runner = SimpleNamespace(get_model=lambda: model)


def test_the_worker_waits_for_its_reads_before_the_trainer_may_overwrite_the_bucket(monkeypatch):
    from rlv_megatron.rollout.worker_ext import WeightSyncExtension

    reload = types.ModuleType("vllm.model_executor.model_loader.reload")
    reload.layerwise = SimpleNamespace(LAYERWISE_INFO={})
    for name, module in {"vllm": types.ModuleType("vllm"), "vllm.model_executor.model_loader.reload": reload,
                         "vllm.config": SimpleNamespace(set_current_vllm_config=lambda c: contextlib.nullcontext())
                         }.items():
        monkeypatch.setitem(sys.modules, name, module)
    log = []
    bucket = [("model.layers.0.w", torch.arange(6.0))]
    buf = torch.empty(transport.bucket_nbytes(bucket), dtype=torch.uint8)  # host: stands in for the IPC mapping
    manifest = transport.pack(bucket, buf)
    monkeypatch.setattr(transport, "open_cuda_ipc", lambda handle, index=None: buf)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(f"synchronize {device}"))
    worker = type("Worker", (WeightSyncExtension, _FakeWorker), {})(log)
    worker.rlv_begin_update = None  # not called: the bucket alone
    worker._rlv_loaded = set()
    assert worker.rlv_load_bucket(_handle("GPU-c"), manifest) == 1
    assert log == ["load", "synchronize 1"]  # after the copies out of the bucket, before returning
    log.clear()
    shm = {"kind": "shm", "path": "unused", "nbytes": buf.numel()}
    monkeypatch.setattr(WeightSyncExtension, "_rlv_buffer", lambda self, handle: buf)
    worker.rlv_load_bucket(shm, manifest)
    assert log == ["load"]  # host memory: nothing to wait for
