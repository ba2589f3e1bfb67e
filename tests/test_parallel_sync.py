"""Weight sync from a sharded trainer (TP=2, PP=2) to the engine on rank 0, and to an engine with vLLM
TP=2: after a train step, vLLM's log-probs of a fixed sequence equal Megatron's; and a DP=2 run of the
trainer repeats the DP=1 run."""

import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.shared_runs import DP_KEYS, DP_SHORT, rl_steps, run_tiny
from tests.test_parallel_step import NO, YES, synthetic_batch

pytestmark = pytest.mark.slow


def sync_worker(model_dir, out_dir, tp, pp, rollout_tp=1):
    from rlv_megatron.config import Config, ParallelConfig
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.rollout.placement import Placement
    from rlv_megatron.rollout.weight_stream import stream_weights
    from rlv_megatron.rollout.engine import VLLMEngine
    from rlv_megatron.train.loop import drain
    from rlv_megatron.train.step import rl_objective, score

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.parallel = ParallelConfig(tp=tp, pp=pp)
    cfg.optim.lr = 1e-2
    cfg.rollout.dtype, cfg.rollout.max_model_len, cfg.rollout.weight_bucket_mb = "float32", 256, 1
    cfg.rollout.tensor_parallel_size = rollout_tp
    policy = Policy(cfg)
    place = Placement.current()
    start = policy.export(Path(out_dir) / "start")
    engine = VLLMEngine(str(start), cfg.rollout) if place.owns_engine else None
    try:
        batch = synthetic_batch()
        seq = batch.tokens[0, :batch.verify_pos[0] + 1].tolist() + [batch.targets[0, batch.verify_pos[0]].item()]
        probe = synthetic_batch(n=1).select(torch.tensor([0]))  # any batch: score() gives target log-probs
        probe.tokens, probe.targets = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
        probe.verify_pos = torch.tensor([len(seq) - 2])
        probe.response_mask = torch.ones_like(probe.targets, dtype=torch.bool)
        before = engine.prompt_logprobs([seq])[0] if engine else None
        old, _ = score(policy.chunks, batch, policy.vocab, 1.0, YES, NO, cfg.train, policy.groups)
        policy.train_step(batch, rl_objective(batch, old, cfg.algo, cfg.verifier, policy.vocab, YES, NO))
        weights = stream_weights(policy, place)
        stats = engine.update_weights(weights) if engine else drain(weights)
        megatron, _ = score(policy.chunks, probe, policy.vocab, 1.0, YES, NO, cfg.train, policy.groups)
        if engine is None:
            return None
        after = engine.prompt_logprobs([seq])[0]
        return {"before": before, "after": after, "megatron": megatron[0].tolist(), "missing": stats.missing,
                "buckets": stats.buckets}
    finally:
        if engine is not None:
            engine.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from rlv_megatron.models.tiny import make_hf_model

    return make_hf_model("llama", tmp_path_factory.mktemp("llama") / "m", seed=5, tie_word_embeddings=True)


@pytest.mark.parametrize("tp,pp,rollout_tp", [(2, 1, 1), (1, 2, 1), pytest.param(1, 1, 2, marks=pytest.mark.two_cores)],
                         ids=["tp2", "pp2", "engine_tp2"])
def test_sharded_weight_sync_reaches_the_engine_intact(llama, tmp_path, tp, pp, rollout_tp):
    r = run_distributed(sync_worker, tp * pp, llama, tmp_path, tp, pp, rollout_tp)[0]
    after, megatron, before = (torch.tensor(r[k]) for k in ("after", "megatron", "before"))
    assert r["missing"] == [] and r["buckets"] > 1
    assert (after - megatron).abs().max() < 1e-4  # the engine holds the trained weights...
    assert (after - before).abs().max() > 1e-2  # ...which moved far more than that


def test_data_parallel_run_repeats_the_single_process_run(tmp_path, dp_reference_run):
    from rlv_megatron.dist import free_port

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    run_tiny(tmp_path, DP_SHORT, launcher)
    one, two = rl_steps(dp_reference_run), rl_steps(tmp_path)
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for step in one:  # same rollouts (seeded per global prompt), same mini-batch loss and update
        for k in DP_KEYS:
            assert two[step][k] == pytest.approx(one[step][k], abs=1e-5, rel=1e-5), (step, k)


def test_a_run_prints_no_library_warnings(dp_reference_run):
    """Between the progress bars a user sees the run's own lines, not warnings from torch, megatron or vLLM
    that nothing in the config can change (run.py and the engine's start filter them where they arise).
    Left: vLLM's one-line "Triton is installed, but doesn't include CPU backend" from the engine process,
    said before vLLM configures its logging."""
    import re

    warned = [line for line in (dp_reference_run / "stderr.txt").read_text().splitlines()
              if re.search(r"\w*Warning\b|Loading safetensors", line)]  # Python's, c10's, vLLM's bar
    assert not warned, warned[:5]
