"""scripts/gpu_check.py, the ready GPU check, on a machine without a GPU: its dry run reports every device check as
SKIP (never PASS), prints one line per check and the summary last; a failing check is a FAIL and exit status 1,
through the shell wrapper too. What the device checks assert on a GPU is not exercised here."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(PASS|FAIL|SKIP) (\w+): (\S.*)$")
SUMMARY = re.compile(r"^gpu_check: (\d+) passed, (\d+) failed, (\d+) skipped$")
DEVICE_CHECKS = {"kernels_fused_logprob", "kernels_grouped_advantage", "cuda_ipc_transport", "train_bf16_vs_cpu_fp32",
                 "checkpoint_resume_bf16", "memory_vs_plan", "te_fp8_step", "vllm_sync_logprobs"}


def _report(out: str) -> tuple[dict, tuple[int, int, int]]:
    lines = out.strip().splitlines()
    summary = SUMMARY.match(lines[-1])
    assert summary, f"last line is not the summary: {lines[-1]!r}"
    checks = {}
    for line in lines[:-1]:
        m = LINE.match(line)
        assert m, f"not a check line: {line!r}"
        checks[m.group(2)] = (m.group(1), m.group(3))
    counts = tuple(int(x) for x in summary.groups())
    assert counts == tuple(sum(s == k for s, _ in checks.values()) for k in ("PASS", "FAIL", "SKIP"))
    return checks, counts


def test_dry_run_skips_the_device_checks_and_ends_with_the_summary():
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    checks, (passed, failed, skipped) = _report(done.stdout)
    assert DEVICE_CHECKS <= set(checks), sorted(checks)
    for name in DEVICE_CHECKS:
        assert checks[name][0] == "SKIP", (name, checks[name])
    assert "no CUDA device" in checks["kernels_fused_logprob"][1] and "no CUDA device" in checks["cuda_ipc_transport"][1]
    for name in ("environment", "imports", "fixed_rollouts"):  # what runs on a CPU, runs
        assert checks[name][0] == "PASS", (name, checks[name])
    assert "plan's trainer estimate" in checks["memory_vs_plan"][1]  # the estimate's path ran
    assert failed == 0 and skipped == len(DEVICE_CHECKS) and passed == 3


def test_a_failing_check_is_a_fail_and_a_non_zero_exit_through_the_wrapper():
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--only", "environment", "--inject-failure"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    checks, counts = _report(done.stdout)
    assert checks["environment"][0] == "PASS"
    assert checks["injected_failure"] == ("FAIL", "deliberate failure (--inject-failure)")
    assert counts == (1, 1, 0)


def test_unknown_check_names_are_refused():
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--only", "no_such_check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no_such_check" in done.stderr


def test_an_error_in_one_check_is_its_fail_and_the_next_checks_still_run():
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)

    def broken(ctx):
        raise KeyError("batch_path")

    def absent(ctx):
        raise gc.Skip("vllm not installed")

    def fine(ctx):
        return "ok"

    lines = []
    rc = gc.run([broken, absent, fine], {"runner": SimpleNamespace(deadline=float("inf"))}, out=lines.append)
    assert rc == 1 and lines[0] == "FAIL broken: KeyError: 'batch_path'"
    assert lines[1] == "SKIP absent: vllm not installed" and lines[2].startswith("PASS fine: ok")
    assert lines[-1] == "gpu_check: 1 passed, 1 failed, 1 skipped"
