"""Faults injected into a short tiny run, whose final metrics must equal a clean run's (issue #19):

1. the vLLM engine process (VLLM::EngineCore) SIGKILLed after a random RL step: replaced, its call repeated;
2. a grader worker (rlv::grader) SIGKILLed: replaced, its answer graded again;
3. the trainer SIGKILLed after a random later step (the trainer alone, as the OOM killer does): the same
   command resumes from the last checkpoint;
4. SIGTERM to the trainer after a random later step (preemption): a checkpoint at the step boundary, exit 0,
   and the same command resumes.
Every RL step's values and both evaluations are compared with the clean run's (to 1e-6); after every exit,
no process of the run and no /dev/shm file it made may be left (the weight buffer a SIGKILLed trainer leaves
is removed by the run that resumes). A fault counts as survived only if it was injected and the run went on.
The grader workers are the reward's (subset_sum grades in the pool too), killed during a step.
Usage: python benchmarks/chaos.py [--seed 0] [--out runs/chaos]   (about 8 minutes on 2 cores)
Last line: `chaos: N faults survived, results equal` (exit 0), or `... results differ` (exit 1).
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
RUN = ["sft.steps=10", f"train.steps={STEPS}", "train.save_every=1", "train.eval_every=4", "eval.num_problems=16",
       "eval.samples=4", "algo.prompts_per_step=4", "algo.group_size=4", "algo.max_tokens=16",
       "algo.kl_beta=0.05", "algo.filter_equal_reward_groups=false"]
KEYS = ("reward/mean", "loss/total", "loss/policy", "loss/verifier", "grad_norm", "policy/kl_to_reference",
        "verifier/accuracy", "eval/pass@1", "eval/weighted@4", "eval/majority@4", "eval/verifier_auc")


def start(out: Path, *extra: str, run: list[str] = RUN) -> subprocess.Popen:
    """The tiny recipe in its own process group (what it leaves is findable), output captured; `proc.shm_watch`
    notes the /dev/shm files there were before it and the ones other process groups use while it runs."""
    before = shm()
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "tiny_cpu.py"), *run, f"train.out_dir={out}",
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    proc.shm_watch = ShmWatch(proc.pid, before)
    return proc


def rows(out: Path) -> dict[int, dict]:
    """The logged values by step (an evaluation's merged into its step's; a repeated step: the resumed run's)."""
    by_step: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step.setdefault(r["step"], {}).update(r)
    return by_step


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 900) -> None:
    """Until RL step `step` is logged."""
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").exists() or not any(
            s >= step and "reward/mean" in r for s, r in rows(out).items()):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no step {step} in {timeout} s")
        time.sleep(0.2)


def child_named(proc: subprocess.Popen, name: str, timeout: float = 60, min_age_s: float = 0.0) -> psutil.Process:
    """The first process under the run called `name` (as `ps` shows it), at least `min_age_s` old."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            for c in psutil.Process(proc.pid).children(recursive=True):
                if c.name() == name and time.time() - c.create_time() >= min_age_s:
                    return c
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {name} process under the run")


def shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _shm_in_use(outside_group: int) -> set[str]:
    """The /dev/shm files that live processes outside process group `outside_group` map or hold open: a
    neighbour's (another test, a pytest-xdist worker), not this run's. By inode: a POSIX semaphore is mapped
    under the temporary name it was created with, then linked to its own."""
    by_inode = {}
    for name in shm():
        try:
            by_inode[os.stat(f"/dev/shm/{name}").st_ino] = name
        except OSError:
            continue
    used = set()
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        if _group(pid) in (outside_group, None):
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(int(line.split()[4]) for line in f if " /dev/shm/" in line)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/"):
                    used.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            continue
    return {by_inode[i] for i in used if i in by_inode}


def leftovers(pgid: int, shm_before: set[str], foreign: set[str] = frozenset(), wait_s: float = 30) -> list[str]:
    """What a finished run left: processes of its group, new /dev/shm files (given `wait_s` to go: the resource
    tracker unlinks a killed engine's shared memory as it exits). A new file that processes of other groups used
    (`foreign`: seen while the run ran; or now) is theirs."""
    deadline = time.time() + wait_s
    while True:
        left = [f"{p.info['name']} (pid {p.pid})" for p in psutil.process_iter(["name"]) if _group(p.pid) == pgid]
        new = shm() - shm_before - foreign
        if new:
            new -= _shm_in_use(pgid)
        left += [f"/dev/shm/{name}" for name in sorted(new)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class ShmWatch:
    """While a run lives: the new /dev/shm files that processes of other groups use (a neighbour's: another
    test's, a pytest-xdist worker's), polled each second, so that they are not taken for the run's leftovers."""

    def __init__(self, pgid: int, before: set[str]):
        self.pgid, self.before, self.foreign = pgid, before, set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(1.0):
            if shm() - self.before - self.foreign:
                self.foreign.update(_shm_in_use(self.pgid))

    def stop(self) -> set[str]:
        self._done.set()
        self._thread.join()
        return self.foreign


def finish(proc: subprocess.Popen, shm_before: set[str] | None = None, timeout: float = 900,
           with_stdout: bool = False) -> tuple:
    """Wait for the run: its exit status, stderr, and what it left behind (new /dev/shm files: since
    `shm_before`, or since `start`); its stdout fourth if `with_stdout`."""
    watch = getattr(proc, "shm_watch", None)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        foreign = watch.stop() if watch else set()
    before = shm_before if shm_before is not None else watch.before
    result = (proc.returncode, err, leftovers(proc.pid, before, foreign))
    return (*result, out) if with_stdout else result


def differences(clean: dict[int, dict], other: dict[int, dict], keys=KEYS, tol: float = 1e-6) -> tuple[list, int]:
    """(step, key, clean value, other value) where they differ, and how many values were compared."""
    diffs, compared = [], 0
    for step in sorted(set(clean) | set(other)):
        for k in keys:
            a, b = clean.get(step, {}).get(k), other.get(step, {}).get(k)
            if a is None and b is None:
                continue
            compared += 1
            if a is None or b is None or abs(a - b) > tol:
                diffs.append((step, k, a, b))
    return diffs, compared


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="picks the steps the faults hit")
    ap.add_argument("--out", default="runs/chaos")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    engine_at, kill_at, term_at = rng.randint(0, 2), rng.randint(4, 5), 6  # after these RL steps
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    clean_dir, chaos_dir = out / "clean", out / "chaos"
    problems, survived = [], []
    before = shm()

    t0 = time.time()
    status, err, left = finish(start(clean_dir), before)
    if status != 0:
        raise SystemExit(f"the clean run failed:\n{err[-3000:]}")
    problems += [f"clean run left {x}" for x in left]
    clean_s = time.time() - t0
    print(f"clean run: {clean_s:.0f} s", flush=True)

    t0 = time.time()
    proc = start(chaos_dir)
    wait_for_step(proc, chaos_dir, engine_at)
    child_named(proc, "VLLM::EngineCore").kill()
    print(f"engine killed after RL step {engine_at}", flush=True)
    wait_for_step(proc, chaos_dir, engine_at + 1)
    child_named(proc, "rlv::grader").kill()
    print(f"grader worker killed after RL step {engine_at + 1}", flush=True)
    wait_for_step(proc, chaos_dir, kill_at)  # the run went on
    survived.append("grader worker killed")
    proc.send_signal(signal.SIGKILL)  # the trainer alone
    status, err, left = finish(proc, before)
    print(f"trainer SIGKILLed after RL step {kill_at}: status {status}", flush=True)
    if "restart 1 of rollout.max_restarts" in err:
        survived.append("engine killed")
    else:
        problems.append("the engine was not restarted")
    problems += [f"left after the trainer's SIGKILL: {x}" for x in left if "rlv-weights-" not in x]
    survived.append("trainer SIGKILLed")

    proc = start(chaos_dir)  # the same command resumes
    wait_for_step(proc, chaos_dir, term_at)
    proc.send_signal(signal.SIGTERM)
    status, err, left = finish(proc, before)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    print(f"SIGTERM after RL step {term_at}: status {status}: {last}", flush=True)
    if status != 0 or not last.startswith("rlv: preempted (SIGTERM)"):
        problems.append(f"SIGTERM: status {status}, {last!r}")
    problems += [f"left after SIGTERM: {x}" for x in left if "rlv-weights-" not in x]
    survived.append("SIGTERM")

    status, err, left = finish(start(chaos_dir), before)  # resumes again and ends
    if status != 0:
        problems.append(f"the last resume failed: {err[-2000:]}")
    problems += [f"left after the chaos run: {x}" for x in left]
    print(f"chaos run: {time.time() - t0:.0f} s over 3 starts (clean: {clean_s:.0f} s)", flush=True)

    diffs, compared = differences(rows(clean_dir), rows(chaos_dir))
    for step, k, a, b in diffs[:20]:
        print(f"  differs: step {step} {k}: clean {a} vs chaos {b}")
    for p in problems:
        print(f"  problem: {p}")
    print(f"{compared} values compared over {STEPS} RL steps and 2 evaluations; {len(diffs)} differ")
    equal = not diffs and not problems and compared > 0
    print(f"chaos: {len(survived)} faults survived, results {'equal' if equal else 'differ'}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
