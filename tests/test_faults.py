"""Faults a long run meets, on the tiny recipe: the vLLM engine process killed (restarted with the current
weights, or, past rollout.max_restarts, a checkpoint and exit 75), SIGKILL to the whole run after a checkpoint,
SIGTERM (a checkpoint at the step boundary, exit 0); each time the same command resumes, and the results equal
a run that met no fault (rollout.mode=overlap and partial rollouts: tests/test_resume.py). After every exit
no process of the run and no /dev/shm segment it made is left."""

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from chaos import child_named, differences, finish, rows, shm, start, wait_for_step  # noqa: E402

from tests.shared_runs import TINY_SHORT as SMALL  # noqa: E402

pytestmark = pytest.mark.slow

KEYS = ("reward/mean", "loss/total", "loss/policy", "loss/verifier", "grad_norm", "policy/kl_to_reference",
        "verifier/accuracy", "eval/weighted@2", "eval/pass@1")


def _finish(proc) -> tuple[int, str, str]:
    """The run's status, stderr and stdout, once nothing of it is left (processes of its group, new /dev/shm
    files)."""
    status, err, left, out = finish(proc, with_stdout=True)
    assert not left, f"left behind: {left}"
    return status, err, out


@pytest.fixture(scope="module")
def clean(clean_tiny_run) -> dict[int, dict]:
    return rows(clean_tiny_run)


def _assert_same(a: dict[int, dict], b: dict[int, dict]) -> None:
    diffs, compared = differences(a, b, KEYS)
    assert not diffs
    assert compared >= 4 * 6 + 2 * 2  # the RL steps' values, the mid-run and the final evaluation's


def _replacement_started(proc, dead_pid: int) -> None:
    """Until the run has started an engine in place of the one killed (its death is then reported)."""
    deadline = time.time() + 300
    while True:
        try:
            if any(c.name() == "VLLM::EngineCore" and c.pid != dead_pid and c.status() != psutil.STATUS_ZOMBIE
                   for c in psutil.Process(proc.pid).children(recursive=True)):
                return
        except psutil.NoSuchProcess:  # a child gone while being looked at
            pass
        assert proc.poll() is None and time.time() < deadline, "no engine replaced the one killed"
        time.sleep(0.2)


def _sigkill_once_checkpointed(proc, out: Path, step: int) -> None:
    """SIGKILL to the run's whole process group (trainer and engine: no cleanup anywhere) once its checkpoint of
    RL step `step` is complete."""
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text().strip() == f"step_{step:08d}"):
        assert proc.poll() is None, f"the run ended before its step-{step} checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)


def test_engine_deaths_sigkill_and_sigterm_each_resume_to_the_clean_results(tmp_path, clean):
    """One run meets every fault in turn, and ends with the clean run's values: the engine dead for good
    (rollout.max_restarts=0: a checkpoint and exit 75); resumed, the engine killed mid-run (restarted with the
    current weights, the call repeated), then SIGKILL to everything after the step-2 checkpoint; resumed from
    it, SIGTERM (a checkpoint at the step boundary, exit 0); resumed again, to the end."""
    proc = start(tmp_path, "rollout.max_restarts=0", run=SMALL)
    wait_for_step(proc, tmp_path, 0)
    child_named(proc, "VLLM::EngineCore").kill()  # SIGKILL, as the OOM killer does
    rc, err, _ = _finish(proc)
    assert rc == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlv: the rollout engine died 1 time(s) in a row during") and \
        "the same command resumes" in last, last
    assert "Traceback" not in err

    proc = start(tmp_path, run=SMALL)  # resumed, with restarts allowed (the default, 3)
    wait_for_step(proc, tmp_path, 1)
    dead = child_named(proc, "VLLM::EngineCore", min_age_s=0.0)
    dead.kill()
    _replacement_started(proc, dead.pid)
    _sigkill_once_checkpointed(proc, tmp_path, 2)
    rc, err, left = finish(proc)  # its /dev/shm files stay: no process was left to unlink them
    assert not [thing for thing in left if not thing.startswith("/dev/shm/")], left
    assert rc == -signal.SIGKILL and "the rollout engine died during" in err, err[-3000:]
    assert "restart 1 of rollout.max_restarts=3" in err

    proc = start(tmp_path, run=SMALL)  # resumed from what the SIGKILL left
    wait_for_step(proc, tmp_path, 2)
    os.kill(proc.pid, signal.SIGTERM)  # the trainer only, as a container runtime does
    rc, err, out = _finish(proc)
    assert rc == 0, err[-3000:]
    assert "checkpoints/step_00000002 (RL step 2)" in out, out[-2000:]  # "resuming from ..."
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlv: preempted (SIGTERM) after RL step") and "the same command resumes" in last, last
    assert not (tmp_path / "metrics.json").exists()

    rc, err, _ = _finish(start(tmp_path, run=SMALL))
    assert rc == 0, err[-3000:]
    _assert_same(clean, rows(tmp_path))


OWNER = """
import sys, time
from rlv_megatron.config import RolloutConfig
from rlv_megatron.models.tiny import make_hf_model
from rlv_megatron.rollout.engine import VLLMEngine

if __name__ == "__main__":
    engine = VLLMEngine(str(make_hf_model("qwen2", sys.argv[1], seed=1)), RolloutConfig(dtype="float32",
                                                                                          max_model_len=256))
    print("ready", flush=True)
    time.sleep(600)
"""


def test_engine_processes_die_with_an_owner_killed_by_sigkill(tmp_path):
    """SIGKILL runs no cleanup in the owner, and vLLM's engine core does not watch its parent: the reaper
    (rollout/reaper.py) kills it."""
    import subprocess

    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    before = shm()
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "model")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    while (line := proc.stdout.readline()) and line.strip() != "ready":
        pass
    children = psutil.Process(proc.pid).children(recursive=True)
    assert {"VLLM::EngineCore", "rlv::reaper"} <= {c.name() for c in children}
    proc.kill()
    proc.wait()
    _, _, left = finish(proc, before)
    assert not left, left  # the engine's processes, and its shared memory (the resource tracker's job)
