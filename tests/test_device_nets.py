"""Nets for GPU-only failures, on CPU: the tensor-level code of a train step run on a stand-in GPU
(tests/fake_gpu.py: a host tensor meeting a GPU tensor raises, as on CUDA), collectives that refuse host
tensors as NCCL does, and a lint that every torch factory call in that code says where its tensor lives."""

import ast
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from tests.fake_gpu import DeviceMismatch, fake_gpu, nccl_collectives, on_gpu, to_gpu
from tests.test_parallel_step import NO, YES, grouped_batch, synthetic_batch

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 1000, 16
GPU = torch.device("meta")  # the stand-in GPU's device (fake_gpu.py)
BATCHING = SimpleNamespace(micro_batch_tokens=256, pack=False, share_prompts=False)


def _algo():
    from rlv_megatron.config import AlgoConfig, VerifierConfig

    return AlgoConfig(), VerifierConfig(lam=1.0)


def _micro_batch(objective, batch):
    from rlv_megatron.train.packing import micro_batches

    return micro_batches(batch, objective.fields, BATCHING)[0]


def _heads(mb, fused: bool):
    """A head over GPU tensors for micro-batch `mb`: logits [R, S, V], or hidden states and an output weight."""
    from rlv_megatron.train.heads import FusedHead, FusedSpec, LogitsHead

    R, S = mb.tokens.shape
    g = torch.Generator().manual_seed(0)
    if not fused:
        logits = to_gpu(torch.randn(R, S, VOCAB, generator=g)).requires_grad_()
        return LogitsHead(logits, VOCAB), logits
    hidden = to_gpu(torch.randn(R, S, HIDDEN, generator=g)).requires_grad_()
    weight = to_gpu(torch.randn(VOCAB + 24, HIDDEN, generator=g)).requires_grad_()  # Megatron's padding rows
    return FusedHead(hidden, weight, VOCAB, FusedSpec(chunk_mb=0.01, use_triton=False)), hidden


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("scoring_pass", [False, True], ids=["one_pass", "with_old_logp"])
def test_rl_objective_forward_backward_on_gpu(fused, scoring_pass):
    """The RL^V loss (policy and verifier terms) and its backward, with every input on the GPU."""
    from rlv_megatron.train.step import rl_objective

    algo, ver = _algo()
    batch = synthetic_batch()
    old = -torch.rand(batch.targets.shape) if scoring_pass else None
    objective = rl_objective(batch, old, algo, ver, VOCAB, YES, NO)
    with fake_gpu():
        mb = _micro_batch(objective, batch).to(GPU)
        head, leaf = _heads(mb, fused)
        total, stats, outputs = objective.loss(head, mb)
        total.backward()
        assert on_gpu(total) and on_gpu(leaf.grad)
        assert all(on_gpu(v) for v in outputs.values())


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_sft_objective_and_scoring_on_gpu(fused):
    from rlv_megatron.train.step import sft_objective, token_fields, verifier_terms

    batch = grouped_batch()
    objective = sft_objective(batch, VOCAB, YES, NO, "full")
    with fake_gpu():
        mb = _micro_batch(objective, batch).to(GPU)
        head, leaf = _heads(mb, fused)
        loss, _, _ = objective.loss(head, mb)
        loss.backward()
        assert on_gpu(leaf.grad)
        # the scoring pass's head calls (score_micro_batches), renormalised over {Yes, No}
        from rlv_megatron.train.packing import micro_batches

        smb = micro_batches(batch, token_fields(batch), BATCHING)[0].to(GPU)
        head, _ = _heads(smb, fused)
        with torch.no_grad():
            logp, _ = head.token_logprobs(smb.fields["target"].long(), 0.7)
            at, _, p_yes = verifier_terms(head, smb, YES, NO, renormalise=True)
        assert on_gpu(logp) and on_gpu(p_yes) and len(p_yes) == int(at.sum())


def test_vocab_parallel_backward_and_padding_only_shard_on_gpu():
    """train.logprob_impl=logits at TP=2: the backward's gradient buffer, and a rank whose shard is padding
    only (its neutral row maximum goes into the MAX all-reduce)."""
    from rlv_megatron.train import vocab_parallel as vp

    targets = torch.randint(0, 10, (6,))
    with fake_gpu(), nccl_collectives():
        logits = to_gpu(torch.randn(6, 16)).requires_grad_()
        with mock.patch.object(vp, "tp_layout", lambda: ("tp", 0, 2)):  # rank 0 of 2: real columns
            lp = vp.target_logprobs(logits, to_gpu(targets), 10)
            lp.sum().backward()
            assert on_gpu(logits.grad) and on_gpu(vp.entropy(logits.detach(), 10))
        with mock.patch.object(vp, "tp_layout", lambda: ("tp", 1, 2)):  # rank 1 of 2: padding only
            pad = to_gpu(torch.randn(6, 16)).requires_grad_()
            vp.target_logprobs(pad, to_gpu(targets), 10).sum().backward()
            assert on_gpu(pad.grad) and on_gpu(vp.entropy(pad.detach(), 10))


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
def test_advantages_reference_on_gpu(estimator):
    from rlv_megatron.algos.advantages import compute_advantages, informative_groups

    rewards, groups = torch.tensor([1.0, 0, 1, 1, 0, 0]), torch.tensor([0, 0, 0, 1, 1, 1])
    want = compute_advantages(estimator, rewards, groups, use_triton=False)
    with fake_gpu():
        got = compute_advantages(estimator, to_gpu(rewards), to_gpu(groups), use_triton=False)
        assert on_gpu(got) and on_gpu(informative_groups(to_gpu(rewards), to_gpu(groups)))
        assert torch.equal(got.cpu(), want)


def test_pipeline_layout_goes_through_the_gpu_under_nccl():
    """score()'s per-token values shared over the pipeline group (PP=2): NCCL refuses a host tensor."""
    from rlv_megatron.train.packing import micro_batches
    from rlv_megatron.train.step import batch_layout, token_fields

    batch = synthetic_batch()
    mbs = micro_batches(batch, token_fields(batch), BATCHING)
    values = [[to_gpu(torch.ones(mb.tokens.shape)), to_gpu(torch.ones(mb.tokens.shape))] for mb in mbs]
    with fake_gpu(), nccl_collectives():
        logp, _ = batch_layout(mbs, values, 2, tuple(batch.targets.shape), "pp")
    assert logp.device.type == "cpu" and logp[batch.response_mask].eq(1).all()


def test_statistics_and_normalisers_go_through_the_gpu_under_nccl():
    from rlv_megatron.algos.losses import Totals
    from rlv_megatron.train.step import base_fields, reduce_stats

    batch = synthetic_batch()
    with fake_gpu(), nccl_collectives():
        stats = reduce_stats([{"a": to_gpu(torch.tensor(2.0))}], ("a",), "dp", "pp")
        Totals.of(batch.policy_mask.float(), "dp")
        base_fields(batch, "dp")
    assert stats == {"a": 2.0}


def test_pipeline_weight_stream_receives_on_the_gpu_under_nccl():
    """A later pipeline stage's tensors reach the engine rank over NCCL (PP > 1): into a GPU tensor."""
    from rlv_megatron.rollout import weight_stream

    def header(box, src):
        box[:] = ["model.norm.weight", ((4,), torch.bfloat16)]

    with fake_gpu(), nccl_collectives(), mock.patch.object(weight_stream.dist, "recv_object_list", header):
        name, t = weight_stream._recv(1)
    assert name == "model.norm.weight" and on_gpu(t) and t.dtype == torch.bfloat16


def test_the_net_catches_a_host_tensor_meeting_a_gpu_tensor():
    """The stand-in GPU itself: what CUDA refuses is refused, what CUDA allows passes."""
    with fake_gpu():
        x = to_gpu(torch.randn(3, 2))
        with pytest.raises(DeviceMismatch):
            torch.cat([x, torch.zeros(3, 2)], 1)
        with pytest.raises(DeviceMismatch):
            torch.sub(x, 1.0, out=torch.zeros(3, 2))
        assert on_gpu(x + torch.tensor(1.0))  # a 0-dim host tensor is a scalar to CUDA
        assert on_gpu(torch.zeros(2, device=x.device)) and not on_gpu(x.cpu())
    with fake_gpu(), nccl_collectives():
        with pytest.raises(DeviceMismatch):
            torch.distributed.all_reduce(torch.zeros(2))


# ---- lint: where every factory call's tensor lives --------------------------------------------------------

FACTORIES = {"zeros", "ones", "full", "empty", "tensor", "arange", "rand", "randn", "randint", "eye",
             "linspace", "as_tensor"}
DEVICE_CODE = ["rlv_megatron/train/step.py", "rlv_megatron/train/vocab_parallel.py", "rlv_megatron/train/heads.py",
               "rlv_megatron/train/packing.py", "rlv_megatron/algos/losses.py", "rlv_megatron/algos/advantages.py",
               "rlv_megatron/models/verifier_head.py", "rlv_megatron/rollout/weight_stream.py",
               "rlv_megatron/rollout/transport.py", "kernels/verifier_loss.py", "kernels/grouped_advantage.py"]


def unplaced_factory_calls(source: str) -> list[int]:
    """Lines of `torch.<factory>(...)` calls with no device= and no `# host` comment on their lines."""
    lines = source.splitlines()
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
                and not any("# host" in line for line in lines[node.lineno - 1:node.end_lineno])):
            bad.append(node.lineno)
    return bad


@pytest.mark.parametrize("path", DEVICE_CODE)
def test_every_factory_call_says_where_its_tensor_lives(path):
    bad = unplaced_factory_calls((ROOT / path).read_text())
    assert not bad, f"{path}: torch factory calls without device= or a '# host' comment at lines {bad}"


def test_the_lint_finds_an_unplaced_call():
    assert unplaced_factory_calls("import torch\na = torch.zeros(3)\nb = torch.zeros(3, device=x.device)\n"
                                  "c = torch.zeros(3)  # host\n") == [2]
