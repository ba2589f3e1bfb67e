"""No silent hangs: user-facing APIs that start helper processes, called from a script without
`if __name__ == "__main__":`, either work (checkpoint.save) or fail at once saying what to add
(GraderPool, the vLLM engine). Each script runs in a subprocess with a timeout well below pytest's."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUARD = 'if __name__ == "__main__":'


def _run(tmp_path, source: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `source` as a script (its own session: a hang's helpers are killed with it)."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the script hung for {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_checkpoint_save_works_from_an_unguarded_script(tmp_path):
    done = _run(tmp_path, """
        import sys
        from rlv_megatron.config import Config
        from rlv_megatron.models.tiny import make_hf_model
        from rlv_megatron.train.policy import Policy
        from rlv_megatron.train import checkpoint

        print("top level runs in", __name__, flush=True)
        cfg = Config()
        cfg.model.path = str(make_hf_model("qwen2", sys.argv[1] + "/m", seed=3))
        policy = Policy(cfg)
        checkpoint.save(policy, sys.argv[1] + "/ckpt", step=1, run_state={"phase": "rl"})
        checkpoint.save(policy, sys.argv[1] + "/ckpt", step=2, run_state={"phase": "rl"})
        print("loaded", checkpoint.load(policy, checkpoint.latest(sys.argv[1] + "/ckpt")), flush=True)
        """, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded {'phase': 'rl', 'step': 2}" in done.stdout
    assert done.stdout.count("top level runs in") == 1, done.stdout  # no helper re-ran the script


def test_grader_pool_from_an_unguarded_script_fails_at_once_saying_what_to_add(tmp_path):
    done = _run(tmp_path, """
        from rlv_megatron.tasks.graders import GraderPool

        with GraderPool("exact", workers=1) as pool:
            print(pool.grade(["a"], ["a"]))
        """, timeout=120)
    assert done.returncode != 0
    assert "UnguardedMainError" in done.stderr and GUARD in done.stderr, done.stderr[-3000:]
    assert "line 4" in done.stderr  # the offending call


def test_grader_pool_from_a_guarded_script_works(tmp_path):
    done = _run(tmp_path, f"""
        from rlv_megatron.tasks.graders import GraderPool

        def main():
            with GraderPool("exact", workers=1) as pool:
                print(pool.grade(["a", "b"], ["a", "c"]))

        {GUARD}
            main()
        """, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "([1.0, 0.0], {'graded': 2, 'timeouts': 0, 'errors': 0})" in done.stdout


def test_vllm_engine_from_an_unguarded_script_fails_at_once(tmp_path):
    # the check comes before vLLM is imported or the model read: no model needed
    done = _run(tmp_path, """
        from rlv_megatron.config import RolloutConfig
        from rlv_megatron.rollout.engine import VLLMEngine

        VLLMEngine("no-such-model", RolloutConfig())
        """, timeout=120)
    assert done.returncode != 0
    assert "UnguardedMainError" in done.stderr and GUARD in done.stderr, done.stderr[-3000:]
