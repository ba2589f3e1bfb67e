"""Checkpoints: saved at TP=2, resumed at TP=1 with the same next step; atomic under a crash mid-save;
truncated or incomplete checkpoints refused naming the file."""

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_parallel_step import KEYS, YES, NO, synthetic_batch

pytestmark = pytest.mark.slow


def _policy(model_dir, tp, dtype="float32"):
    from rlv_megatron.config import Config, ParallelConfig
    from rlv_megatron.train.policy import Policy

    cfg = Config()
    cfg.model.path, cfg.model.params_dtype = str(model_dir), dtype
    cfg.parallel = ParallelConfig(tp=tp)
    cfg.optim.lr, cfg.optim.eps = 1e-3, 1e-6
    return Policy(cfg)


def _step(policy):
    from megatron.core import parallel_state as ps

    from rlv_megatron.train.step import rl_objective, score

    batch = synthetic_batch()  # under DP, each rank's share of it
    batch = batch.select(torch.arange(len(batch)).chunk(ps.get_data_parallel_world_size())[
        ps.get_data_parallel_rank()])
    old, _ = score(policy.chunks, batch, policy.vocab, 1.0, YES, NO, policy.cfg.train, policy.groups)
    old = old + 0.2 * torch.sin(torch.arange(old.numel()).view_as(old).float())
    return policy.train_step(batch, rl_objective(batch, old, policy.cfg.algo, policy.cfg.verifier, policy.vocab,
                                                 YES, NO, dp_group=policy.groups.dp))


def save_then_continue(model_dir, root, tp):
    from rlv_megatron.train import checkpoint

    policy = _policy(model_dir, tp)
    _step(policy)
    checkpoint.save(policy, root, step=1, run_state={"phase": "rl"})
    return [_step(policy), _step(policy)]


def resume_and_step(model_dir, root, tp, optimizer=True):
    from rlv_megatron.train import checkpoint

    policy = _policy(model_dir, tp)
    state = checkpoint.load(policy, checkpoint.latest(root), optimizer=optimizer)
    return state, [_step(policy), _step(policy)]


def bf16_dp2_run(model_dir, root, resume):
    """bfloat16 weights, DP=2 with the distributed optimizer: a step and a checkpoint (resume=False) or a new
    process loading it (resume=True), then two more steps. Returns the steps' statistics, the model's tensors
    and every optimizer tensor this rank holds (fp32 main params, Adam moments and steps)."""
    from rlv_megatron.train import checkpoint

    policy = _policy(model_dir, 1, "bfloat16")
    if resume:
        assert checkpoint.load(policy, checkpoint.latest(root)) == {"phase": "rl", "step": 1}
    else:
        _step(policy)
        checkpoint.save(policy, root, step=1, run_state={"phase": "rl"})
    steps = [_step(policy), _step(policy)]
    model = {k: v.clone() for k, v in policy.model.state_dict().items() if torch.is_tensor(v)}
    opt_tensors = [t.clone() for opt in policy.optimizer.chained_optimizers for g in opt.optimizer.param_groups
                   for p in g["params"] for t in (p, *opt.optimizer.state[p].values())]
    return steps, model, opt_tensors


def export_and_compare(model_dir, root, out):
    """`rlv export` by default and with --dtype bfloat16: each exported tensor's dtype and whether it equals
    the checkpoint's weight (cast to that dtype) bit for bit."""
    from safetensors.torch import load_file

    from rlv_megatron import cli
    from rlv_megatron.train import checkpoint

    policy = _policy(model_dir, 1)
    checkpoint.load(policy, checkpoint.latest(root), optimizer=False)
    weights = dict(policy.hf_tensors())
    found = {}
    for dtype in (None, "bfloat16"):
        dest = Path(out) / str(dtype)
        assert cli.main(["export", str(root), str(dest), "--model", str(model_dir)]
                        + (["--dtype", dtype] if dtype else [])) == 0
        exported = load_file(str(dest / "model.safetensors"))
        found[dtype] = {(str(t.dtype), torch.equal(t, weights[n].to(t.dtype))) for n, t in exported.items()}
    return found


def bf16_export_follows_training(model_dir, out):
    """export_hf without a dtype writes a bfloat16-trained model in bfloat16: its weights exactly, the float32
    norm weights rounded. (Whole bf16 checkpoints: test_bf16_dp2_checkpoint_resumes_bit_for_bit.)"""
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from rlv_megatron.config import Config
    from rlv_megatron.models.hf_io import export_hf
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train import checkpoint

    cfg = Config()
    cfg.model.path, cfg.model.params_dtype = str(model_dir), "bfloat16"
    policy = Policy(cfg)
    # the weights alone, as a checkpoint holds them: bf16 by element count, though the norms are fp32
    Path(out, "weights").mkdir(parents=True)
    with checkpoint._in_process_write_results():
        dist_checkpointing.save(policy.model_chunks[0].sharded_state_dict(), str(Path(out, "weights")))
    assert checkpoint.params_dtype(Path(out, "weights")) == "bfloat16"
    export_hf(policy.model_chunks, policy.arch, Path(out, "hf"))
    exported = load_file(str(Path(out, "hf", "model.safetensors")))
    return {(str(exported[n].dtype), torch.equal(exported[n], w.to(torch.bfloat16))) for n, w in policy.hf_tensors()}


def crash_mid_save(model_dir, root):
    from megatron.core import dist_checkpointing

    from rlv_megatron.train import checkpoint

    policy = _policy(model_dir, 1)
    real = dist_checkpointing.save

    def dies_half_way(state, path, **kw):
        real(state, path, **kw)
        raise KeyboardInterrupt("killed during the save")

    dist_checkpointing.save = dies_half_way
    try:
        checkpoint.save(policy, root, step=2, run_state={})
    except KeyboardInterrupt:
        pass
    dist_checkpointing.save = real
    return str(checkpoint.latest(root).name)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from rlv_megatron.models.tiny import make_hf_model

    # special-token ids beyond bos/eos (config.json and generation_config.json): export keeps them
    return make_hf_model("qwen2", tmp_path_factory.mktemp("qwen") / "m", seed=3, pad_token_id=0, unk_token_id=3,
                         sep_token_id=4)


def test_tp2_checkpoint_resumes_at_tp1_with_the_same_next_step(qwen, tmp_path):
    from rlv_megatron.train import checkpoint

    root = tmp_path / "ckpt"
    continued = run_distributed(save_then_continue, 2, qwen, root, 2)[0]
    state, resumed = run_distributed(resume_and_step, 1, qwen, root, 1)[0]
    assert state == {"phase": "rl", "step": 1}
    for s, tol in enumerate((1e-5, 1e-4)):  # TP=2 vs TP=1 rounding, amplified by one more Adam step
        for k in KEYS:
            assert resumed[s][k] == pytest.approx(continued[s][k], abs=tol, rel=tol), (s, k)
    # the Adam states came along: resuming the weights alone takes another third step
    _, weights_only = run_distributed(resume_and_step, 1, qwen, root, 1, False)[0]
    assert weights_only[0]["loss/total"] == pytest.approx(continued[0]["loss/total"], rel=1e-5)
    assert weights_only[1]["loss/total"] != pytest.approx(continued[1]["loss/total"], rel=1e-4)

    # `rlv export`: the TP=2 checkpoint as a Hugging Face directory; by default in the training dtype
    # (float32 here), equal to the checkpoint's weights bit for bit; --dtype bfloat16 rounds them once
    found = run_distributed(export_and_compare, 1, qwen, root, tmp_path / "hf")[0]
    assert found == {None: {("torch.float32", True)}, "bfloat16": {("torch.bfloat16", True)}}
    import transformers

    hf = tmp_path / "hf" / "None"
    assert transformers.AutoModelForCausalLM.from_pretrained(hf).dtype == torch.float32  # loads in transformers
    config = json.loads((hf / "config.json").read_text())
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id")
    assert [config[k] for k in ids] == [1, 2, 0, 3, 4] and config["dtype"] == "float32"
    assert json.loads((tmp_path / "hf" / "bfloat16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((hf / "generation_config.json").read_text()) == json.loads(
        (qwen / "generation_config.json").read_text())  # the source's, as it was

    # a crash after the files were written but before the rename: `latest` still names step 1
    assert run_distributed(crash_mid_save, 1, qwen, root)[0] == "step_00000001"
    assert not (root / "step_00000002").exists()

    ckpt = checkpoint.latest(root)
    victim = max((p for p in ckpt.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST),
                 key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=f"{victim.name}.*truncated"):
        checkpoint.latest(root)
    victim.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"{victim.name} is missing"):
        checkpoint.verify(ckpt)
    (ckpt / checkpoint.MANIFEST).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.verify(ckpt)


def test_bf16_model_exports_in_bf16_exactly(qwen, tmp_path):
    assert run_distributed(bf16_export_follows_training, 1, qwen, tmp_path)[0] == {("torch.bfloat16", True)}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_bf16_dp2_checkpoint_resumes_bit_for_bit(qwen, tmp_path):
    """Issue 29: a bfloat16 run with the distributed optimizer could not save (megatron's stale optimizer
    index map in groups mixing fp32 norms and bf16 biases, checkpoint._sync_param_index_map). Saved at DP=2,
    the process ended, a new one resumed at DP=2: the same layout and the same arithmetic, so the next two
    steps equal the uninterrupted run's bit for bit, statistics, weights and optimizer states alike."""
    root = tmp_path / "ckpt"
    whole = run_distributed(bf16_dp2_run, 2, qwen, root, False)
    resumed = run_distributed(bf16_dp2_run, 2, qwen, root, True)
    for (steps_a, model_a, opt_a), (steps_b, model_b, opt_b) in zip(whole, resumed):
        assert steps_b == steps_a
        assert model_b.keys() == model_a.keys() and all(torch.equal(model_b[k], model_a[k]) for k in model_a)
        assert len(opt_b) == len(opt_a) and all(torch.equal(b, a) for a, b in zip(opt_a, opt_b))
    steps, model, _ = whole[0]
    assert {str(t.dtype) for t in model.values()} == {"torch.bfloat16", "torch.float32"}  # bf16, fp32 norms
    assert steps[1]["loss/total"] != steps[0]["loss/total"]  # the steps after the checkpoint did train
    assert not torch.equal(whole[0][2][0], whole[1][2][0])  # each rank holds its own shard of the states
