"""The Slurm scripts on a real one-node Slurm cluster (slurm-wlm + munge on localhost, as root; CI installs
them with `scripts/slurm_local.sh install` and sets RLV_REQUIRE_SLURM=1 so that a missing Slurm fails).

One job of slurm/tiny_cpu.sh with a short config across 2 tasks: it trains, checkpoints every step, and
is preempted after its second checkpoint (USR1 to the batch script, as `--signal` does before a time
limit); the script requeues it, the restart resumes from the checkpoint and the job finishes with status 0.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rlv_megatron.hydra_app import compose
from tests.cores import every_core
from tests.shared_runs import DP_KEYS, DP_SHORT, rl_steps

ROOT = Path(__file__).resolve().parents[1]
HAVE_SLURM = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")) and os.geteuid() == 0


def test_batch_scripts_parse_and_launch_existing_recipes():
    for script in ("tiny_cpu.sh", "math_7b.sh", "rlv_r1_32b.sh", "math_7b_overlap.sh", "rlv_r1_32b_overlap.sh",
                   "math_7b_disagg.sh", "rlv_r1_32b_disagg.sh", "common.sh"):
        out = subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)
    for script, launch in (("math_7b.sh", "recipes/math_7b.py"), ("rlv_r1_32b.sh", "recipes/r1_32b.py"),
                           ("math_7b_overlap.sh", "recipes/math_7b.py --config-name math_7b_overlap"),
                           ("rlv_r1_32b_overlap.sh", "recipes/r1_32b.py --config-name r1_32b_overlap"),
                           ("math_7b_disagg.sh", "recipes/math_7b.py --config-name math_7b_disagg"),
                           ("rlv_r1_32b_disagg.sh", "recipes/r1_32b.py --config-name r1_32b_disagg")):
        text = (ROOT / "slurm" / script).read_text()
        recipe, _, config = launch.partition(" --config-name ")
        assert f"launch_torchrun {launch} " in text and (ROOT / recipe).exists()
        assert not config or (ROOT / "rlv_megatron" / "conf" / f"{config}.yaml").exists()
        # torchrun starts GPUS_PER_NODE - ENGINE_GPUS ranks: the script's ENGINE_GPUS is the config's
        engine_gpus = compose(config or Path(recipe).stem, []).rollout.engine_gpus
        assert (f"ENGINE_GPUS={engine_gpus} launch_torchrun" in text) == (engine_gpus > 0)
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not HAVE_SLURM:
        if os.environ.get("RLV_REQUIRE_SLURM") == "1":
            pytest.fail("RLV_REQUIRE_SLURM=1 but slurm-wlm/munge are not installed or not root "
                        "(scripts/slurm_local.sh install)")
        pytest.skip("needs slurm-wlm and munge as root: scripts/slurm_local.sh install (CI does)")
    state = tmp_path_factory.mktemp("slurm")
    with every_core():  # the node's CPUs are the cores its daemons see, and the job's 2 tasks need 2
        start = subprocess.run(["bash", str(ROOT / "scripts/slurm_local.sh"), "start", str(state)],
                               capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        pids = [int(p.read_text()) for p in (state / "pids").glob("*")]
        subprocess.run(["bash", str(ROOT / "scripts/slurm_local.sh"), "stop", str(state)], timeout=60)
        for pid in pids:  # stopped by PID, and really gone
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def _squeue(env, job):
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True, env=env)
    return out.stdout.strip()


def _wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_tiny_job_trains_on_two_tasks_checkpoints_and_resumes_after_preemption(cluster, tmp_path, request):
    env = {**cluster, "RLV_RUN_ROOT": str(tmp_path), "RLV_PYTHON": str(ROOT / ".venv/bin/python")}
    job = subprocess.Popen(["sbatch", "--wait", "--parsable", f"--output={tmp_path}/job.out",
                            str(ROOT / "slurm/tiny_cpu.sh"), *DP_SHORT],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: list(tmp_path.glob("rlv-tiny-cpu-*/checkpoints/step_00000002")), 300,
                  "the second checkpoint")
        job_id = next(tmp_path.glob("rlv-tiny-cpu-*")).name.rsplit("-", 1)[1]
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
        _wait_for(lambda: _squeue(env, job_id).startswith("PENDING"), 120, "the requeued job")
        # Slurm delays a requeued job by about two minutes; release it now (an admin's `scontrol update`)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    run = tmp_path / f"rlv-tiny-cpu-{job_id}"
    log = (run / "logs" / f"job-{job_id}.log").read_text()
    assert job.returncode == 0, stderr + log[-4000:]
    assert "signal received: requeueing job" in log and "(restart 1)" in log
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert resumed and "checkpoints/step_0000000" in resumed[0]
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["layout_pp_tp_dp"] == [1, 1, 2]  # two data-parallel ranks
    final = json.loads((run / "metrics.json").read_text())
    assert final["num_problems"] == 4
    # what the job computed, preempted and on two data-parallel tasks, is the same config's run in one process
    # (asked for only now: the other pytest-xdist worker computes it meanwhile, rather than this one waiting)
    dp_reference_run = request.getfixturevalue("dp_reference_run")
    one, job_steps = rl_steps(dp_reference_run), rl_steps(run)
    assert sorted(job_steps) == sorted(one) == [0, 1, 2, 3]
    for step in one:
        for k in DP_KEYS:
            assert job_steps[step][k] == pytest.approx(one[step][k], abs=1e-5, rel=1e-5), (step, k)
    reference = json.loads((dp_reference_run / "metrics.json").read_text())
    assert final == pytest.approx(reference, abs=1e-5, rel=1e-5, nan_ok=True)  # the final evaluation too
