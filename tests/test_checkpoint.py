"""Checkpoints: saved at TP=2, resumed at TP=1 with the same next step; atomic under a crash mid-save;
truncated or incomplete checkpoints refused naming the file."""

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_parallel_step import KEYS, YES, NO, synthetic_batch

pytestmark = pytest.mark.slow


def _policy(model_dir, tp):
    from rlv_megatron.config import Config, ParallelConfig
    from rlv_megatron.policy import Policy

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.parallel = ParallelConfig(tp=tp)
    cfg.optim.lr, cfg.optim.eps = 1e-3, 1e-6
    return Policy(cfg)


def _step(policy):
    from rlv_megatron.train.step import rl_objective, score

    batch = synthetic_batch()
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


def export_and_compare(model_dir, root, out):
    from safetensors.torch import load_file

    from rlv_megatron import cli
    from rlv_megatron.train import checkpoint

    assert cli.main(["export", str(root), str(out), "--model", str(model_dir), "--dtype", "float32"]) == 0
    exported = load_file(str(Path(out) / "model.safetensors"))
    policy = _policy(model_dir, 1)
    checkpoint.load(policy, checkpoint.latest(root), optimizer=False)
    return max((exported[n] - t).abs().max().item() for n, t in policy.hf_tensors())


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

    return make_hf_model("qwen2", tmp_path_factory.mktemp("qwen") / "m", seed=3)


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

    # `rlv export`: the TP=2 checkpoint as a Hugging Face directory, equal to the checkpoint's weights
    assert run_distributed(export_and_compare, 1, qwen, root, tmp_path / "hf")[0] == 0.0
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # loads in transformers

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
