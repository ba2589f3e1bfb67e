"""The engine processes must not outlive their owner. A trainer (or server) killed with SIGKILL runs no
cleanup, and vLLM's engine core does not watch its parent: it stayed alive, holding its memory, its workers
and, on a GPU, the GPU. A small process per owner (`python -m rlv_megatron.rollout.reaper`, named rlv::reaper)
notes the owner's vLLM processes while the owner lives and kills them once it is gone; grader workers and
multiprocessing's resource tracker end by themselves when their pipes close."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

_started: subprocess.Popen | None = None


def ensure_reaper() -> None:
    """Start this process's reaper once (before its first engine)."""
    global _started
    if _started is None or _started.poll() is not None:
        root = str(Path(__file__).resolve().parents[2])  # importable without the package installed, as recipes run
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        _started = subprocess.Popen([sys.executable, "-m", "rlv_megatron.rollout.reaper", str(os.getpid())],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)


def watch(owner: int, period_s: float = 0.5) -> list[int]:
    """Until `owner` is gone, note its vLLM descendants; then kill the ones still running. Returns their pids."""
    import psutil

    seen: dict[int, psutil.Process] = {}
    while os.getppid() == owner:  # reparented once the owner dies
        try:
            for p in psutil.Process(owner).children(recursive=True):
                if p.pid not in seen and p.name().startswith("VLLM::"):
                    seen[p.pid] = p
        except psutil.Error:  # a child gone between the listing and its name
            pass
        time.sleep(period_s)
    killed = []
    for pid, p in seen.items():
        try:
            if p.is_running():  # the same process (psutil compares its start time): not a reused pid
                p.kill()
                killed.append(pid)
        except psutil.Error:
            pass
    return killed


if __name__ == "__main__":
    try:
        import setproctitle

        setproctitle.setproctitle("rlv::reaper")
    except ImportError:
        pass
    watch(int(sys.argv[1]))
