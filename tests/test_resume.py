"""Exact resume: a run killed with SIGKILL after its step-2 checkpoint and started again with the same
command gives the same rewards and losses, step for step, as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["sft.steps=10", "train.steps=4", "train.save_every=1", "eval.num_problems=4", "eval.samples=2",
         "algo.prompts_per_step=4", "algo.group_size=4", "algo.max_tokens=16", "algo.kl_beta=0.05",
         "algo.filter_equal_reward_groups=false"]
KEYS = ("reward/mean", "loss/total", "loss/policy", "loss/verifier", "grad_norm", "policy/kl_to_reference",
        "verifier/accuracy")


def _cmd(out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "tiny_cpu.py"), *SMALL, f"train.out_dir={out}"]


def _rl_steps(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}  # a repeated step: the resumed run's, last


def test_sigkill_and_resume_repeats_the_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cmd(whole), check=True, cwd=ROOT, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the engine dies with it
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text().strip() == "step_00000002"):
        assert proc.poll() is None, "the run ended before its step-2 checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()  # it really was cut short

    resumed = subprocess.run(_cmd(killed), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "RL step 2" in resumed.stdout
    a, b = _rl_steps(whole), _rl_steps(killed)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in (2, 3):  # the steps the resumed run computed
        for k in KEYS:
            assert b[step][k] == pytest.approx(a[step][k], abs=1e-6), (step, k)
    assert a[3]["loss/total"] != pytest.approx(a[2]["loss/total"], abs=1e-4)  # steps differ: not vacuous
