"""Runs that several test files compare against, computed once per test session: also across pytest-xdist
workers, where the first worker to need one computes it under a file lock and the other waits and reads it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]

# The tiny recipe, short: 10 SFT steps of 16 problems (a barely warm-started model: response lengths vary 10x
# and more), 4 RL steps with a checkpoint after each, evaluations at step 2 and the end. tests/test_faults.py
# interrupts it and compares with its clean run; tests/test_resume.py runs it under rollout.mode=overlap.
TINY_SHORT = ["sft.steps=10", "sft.batch_size=16", "train.steps=4", "train.save_every=1", "eval.num_problems=4", "eval.samples=2",
              "algo.prompts_per_step=4", "algo.group_size=4", "algo.max_tokens=16", "algo.kl_beta=0.05",
              "algo.filter_equal_reward_groups=false", "train.eval_every=2"]

# No warm start, 4 RL steps with a checkpoint after each: the Slurm job's config (tests/test_slurm.py, two
# data-parallel tasks) and the data-parallel run's (tests/test_parallel_sync.py); their reference is its run in
# one process.
DP_SHORT = ["sft.steps=0", "train.steps=4", "train.save_every=1", "eval.num_problems=4", "eval.samples=2",
            "algo.prompts_per_step=4", "algo.group_size=4", "algo.max_tokens=12",
            "algo.filter_equal_reward_groups=false", "rollout.dtype=float32"]
DP_KEYS = ("reward/mean", "loss/total", "loss/verifier", "grad_norm", "response/length_mean")


def session_dir(tmp_path_factory) -> Path:
    """The directory every worker of this pytest session sees."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """`make(out)` once per session: its output directory, made by whichever worker came first."""
    out = session_dir(tmp_path_factory) / "shared" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out.parent / f"{name}.done"
    with FileLock(f"{out}.lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)  # raises if the run failed: the next test to need it tries again
            done.touch()
    return out


def run_tiny(out: Path, args: list[str], launcher: list[str] | None = None) -> None:
    """The tiny recipe in `out`, one thread per process (as the Slurm job runs it)."""
    proc = subprocess.run([*(launcher or [sys.executable]), str(ROOT / "recipes" / "tiny_cpu.py"), *args,
                           f"train.out_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    (out / "stderr.txt").write_text(proc.stderr)  # what a user sees between the progress bars
    assert proc.returncode == 0, proc.stderr[-4000:]


def rl_steps(out: Path) -> dict[int, dict]:
    """Each RL step's logged values (a step logged twice, by a run and the one that resumed it: the latter's)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}
