"""`rlv eval` end to end on the tiny CPU model's checkpoint: exported to a Hugging Face directory, then vLLM
samples, grades, scores with P("Yes"), writes the pool and every output; `--pool` on that file recomputes
the same metrics."""

import json
import subprocess
import sys

import pytest

from tests.distributed import run_distributed

pytestmark = pytest.mark.slow


def _save_checkpoint(run_dir):
    """A run's layout: start/ (HF directory with the tokenizer) and checkpoints/ (megatron dist checkpoint)."""
    from rlv_megatron.config import Config
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.run import scratch_arch
    from rlv_megatron.tasks import subset_sum
    from rlv_megatron.train import checkpoint

    tok = subset_sum.make_tokenizer()
    policy = Policy(Config(), scratch_arch(Config(), len(tok), tok))
    policy.export(f"{run_dir}/start", tok)
    checkpoint.save(policy, f"{run_dir}/checkpoints", step=1, run_state={})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_distributed(_save_checkpoint, 1, str(out))
    return out


def test_rlv_eval_end_to_end(run_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["--out", str(out), "task.name=subset_sum", "eval.num_problems=3", "eval.samples=4",
            "eval.budgets=[6,16]", "eval.temperature=1.0", "eval.taus=[0.1,0.9]", "eval.subsets=20",
            "rollout.dtype=float32", "rollout.max_model_len=128", "task.grader_workers=1"]
    done = subprocess.run([sys.executable, "-m", "rlv_megatron.cli", "eval", str(run_dir / "checkpoints"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 4
    fields = {"problem_id", "sample", "answer", "correct", "score", "length", "logprob_mean", "max_tokens", "task"}
    assert all(set(r) == fields for r in rows)
    by_budget = {b: [r for r in rows if r["max_tokens"] == b] for b in (6, 16)}
    for short, long in zip(by_budget[6], by_budget[16]):  # the same samples, cut at 6 tokens
        assert short["problem_id"] == long["problem_id"] and short["length"] == min(long["length"], 6)
        assert long["sample"].startswith(short["sample"]) and 0.0 <= short["score"] <= 1.0
    assert max(r["length"] for r in by_budget[16]) > 6  # an untrained model runs past the short budget
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep["budgets"]) == {"6", "16"} and [a["tau"] for a in rep["adaptive"]] == [0.1, 0.9]
    assert rep["budgets"]["16"]["samples"] == 4 and "weighted@4" in rep["budgets"]["16"]
    for name in ("report.md", "accuracy_vs_samples.png", "accuracy_vs_tokens.png", "tb"):
        assert (out / name).exists(), name
    from tests.cli import rlv

    again = rlv("eval", "--pool", str(out / "pool.jsonl"), "--out", str(tmp_path / "again"), *args[2:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["budgets"] == rep["budgets"]
