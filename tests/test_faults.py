"""Faults a long run meets, on the tiny recipe: the vLLM engine process killed (restarted with the current
weights, or, past rollout.max_restarts, a checkpoint and exit 75), SIGTERM (a checkpoint at the step boundary,
exit 0); each time the same command resumes, and the results equal a run that met no fault. After every exit
no process of the run and no /dev/shm segment it made is left."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["sft.steps=10", "train.steps=4", "train.save_every=1", "eval.num_problems=4", "eval.samples=2",
         "algo.prompts_per_step=4", "algo.group_size=4", "algo.max_tokens=16", "algo.kl_beta=0.05",
         "algo.filter_equal_reward_groups=false", "train.eval_every=2"]
KEYS = ("reward/mean", "loss/total", "loss/policy", "loss/verifier", "grad_norm", "policy/kl_to_reference",
        "verifier/accuracy", "eval/weighted@2", "eval/pass@1")


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "tiny_cpu.py"), *SMALL, f"train.out_dir={out}", *extra]


def _rows(out: Path) -> dict[int, dict]:
    """The logged values by step (an eval row merged into its step's; a repeated step: the resumed run's)."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
    return rows


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(out, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: what it leaves is findable


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not ((out / "metrics.jsonl").exists() and any(
            json.loads(line)["step"] >= step and "reward/mean" in json.loads(line)
            for line in (out / "metrics.jsonl").read_text().splitlines())):
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.2)


def _engine_core(proc: subprocess.Popen) -> psutil.Process:
    deadline = time.time() + 60
    while time.time() < deadline:
        cores = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "VLLM::EngineCore"]
        if cores:
            return cores[0]
        time.sleep(0.2)
    raise AssertionError("no VLLM::EngineCore process under the run")


def _finish(proc: subprocess.Popen, shm_before: set[str]) -> tuple[int, str]:
    """Wait for the run; assert that nothing of it is left (processes of its group, new /dev/shm files)."""
    _, err = proc.communicate(timeout=900)
    deadline = time.time() + 30  # the resource tracker unlinks what dead processes leaked as it exits
    while True:
        left = [p for p in psutil.process_iter(["pid", "name"]) if _group(p) == proc.pid]
        new_shm = _shm() - shm_before
        if not left and not new_shm:
            return proc.returncode, err
        if time.time() > deadline:
            raise AssertionError(f"left behind: {[(p.pid, p.info['name']) for p in left]}, {sorted(new_shm)}")
        time.sleep(0.5)


def _group(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("clean")
    shm = _shm()
    rc, err = _finish(_start(out), shm)  # nothing left after a normal exit either
    assert rc == 0, err[-3000:]
    return _rows(out)


def _assert_same(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b)
    compared = 0
    for step in a:
        for k in KEYS:
            if k in a[step]:
                assert b[step][k] == pytest.approx(a[step][k], abs=1e-6), (step, k)
                compared += 1
    assert compared >= 4 * 6 + 2 * 2  # the RL steps' values, the mid-run and the final evaluation's


def test_engine_killed_mid_run_is_restarted_and_the_run_repeats_the_clean_one(tmp_path, clean):
    shm = _shm()
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path, 0)
    _engine_core(proc).kill()  # SIGKILL, as the OOM killer does
    rc, err = _finish(proc, shm)
    assert rc == 0, err[-3000:]
    assert "the rollout engine died during" in err and "restart 1 of rollout.max_restarts=3" in err
    _assert_same(clean, _rows(tmp_path))


def test_engine_dead_for_good_then_sigterm_each_resume_to_the_clean_results(tmp_path, clean):
    shm = _shm()
    proc = _start(tmp_path, "rollout.max_restarts=0")
    _wait_for_step(proc, tmp_path, 0)
    _engine_core(proc).kill()
    rc, err = _finish(proc, shm)
    assert rc == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlv: the rollout engine died 1 time(s) in a row during") and \
        "the same command resumes" in last, last
    assert "Traceback" not in err

    proc = _start(tmp_path, "rollout.max_restarts=0")  # the same command
    _wait_for_step(proc, tmp_path, 2)
    os.kill(proc.pid, signal.SIGTERM)  # the trainer only, as a container runtime does
    rc, err = _finish(proc, shm)
    assert rc == 0, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlv: preempted (SIGTERM) after RL step") and "the same command resumes" in last, last
    assert not (tmp_path / "metrics.json").exists()

    rc, err = _finish(_start(tmp_path, "rollout.max_restarts=0"), shm)
    assert rc == 0, err[-3000:]
    _assert_same(clean, _rows(tmp_path))
