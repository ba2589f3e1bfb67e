"""Faults a long run meets, on the tiny recipe: the vLLM engine process killed (restarted with the current
weights, or, past rollout.max_restarts, a checkpoint and exit 75), SIGTERM (a checkpoint at the step boundary,
exit 0); each time the same command resumes, and the results equal a run that met no fault. After every exit
no process of the run and no /dev/shm segment it made is left."""

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from chaos import child_named, differences, finish, rows, shm, start, wait_for_step  # noqa: E402

from tests.shared_runs import TINY_SHORT as SMALL  # noqa: E402

pytestmark = pytest.mark.slow

KEYS = ("reward/mean", "loss/total", "loss/policy", "loss/verifier", "grad_norm", "policy/kl_to_reference",
        "verifier/accuracy", "eval/weighted@2", "eval/pass@1")


def _finish(proc) -> tuple[int, str]:
    """The run's status and stderr, once nothing of it is left (processes of its group, new /dev/shm files)."""
    status, err, left = finish(proc)
    assert not left, f"left behind: {left}"
    return status, err


@pytest.fixture(scope="module")
def clean(clean_tiny_run) -> dict[int, dict]:
    return rows(clean_tiny_run)


def _assert_same(a: dict[int, dict], b: dict[int, dict]) -> None:
    diffs, compared = differences(a, b, KEYS)
    assert not diffs
    assert compared >= 4 * 6 + 2 * 2  # the RL steps' values, the mid-run and the final evaluation's


def test_engine_deaths_and_sigterm_each_resume_to_the_clean_results(tmp_path, clean):
    """One run meets every fault in turn, and ends with the clean run's values: the engine dead for good
    (rollout.max_restarts=0: a checkpoint and exit 75), then, resumed, the engine killed mid-run (restarted with
    the current weights, the call repeated) and SIGTERM (a checkpoint at the step boundary, exit 0)."""
    proc = start(tmp_path, "rollout.max_restarts=0", run=SMALL)
    wait_for_step(proc, tmp_path, 0)
    child_named(proc, "VLLM::EngineCore").kill()  # SIGKILL, as the OOM killer does
    rc, err = _finish(proc)
    assert rc == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlv: the rollout engine died 1 time(s) in a row during") and \
        "the same command resumes" in last, last
    assert "Traceback" not in err

    proc = start(tmp_path, run=SMALL)  # resumed, with restarts allowed (the default, 3)
    wait_for_step(proc, tmp_path, 1)
    child_named(proc, "VLLM::EngineCore", min_age_s=0.0).kill()
    wait_for_step(proc, tmp_path, 2)
    os.kill(proc.pid, signal.SIGTERM)  # the trainer only, as a container runtime does
    rc, err = _finish(proc)
    assert rc == 0, err[-3000:]
    assert "the rollout engine died during" in err and "restart 1 of rollout.max_restarts=3" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlv: preempted (SIGTERM) after RL step") and "the same command resumes" in last, last
    assert not (tmp_path / "metrics.json").exists()

    rc, err = _finish(start(tmp_path, run=SMALL))
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

    import psutil

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
