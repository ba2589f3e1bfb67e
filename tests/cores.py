"""The cores of a pytest-xdist worker: worker i runs on core i (mod the cores), and so does every process its
tests start, so that two workers never share a core; `every_core` lends the whole machine for a while."""

import contextlib
import os

ALL_CORES = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _worker_cores() -> set[int] | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or ALL_CORES is None:
        return None
    cores = sorted(ALL_CORES)
    return {cores[int(worker.removeprefix("gw")) % len(cores)]}


MY_CORES = _worker_cores()


def pin_worker() -> None:
    if MY_CORES is not None:
        os.sched_setaffinity(0, MY_CORES)
        import torch

        torch.set_num_threads(1)


@contextlib.contextmanager
def every_core():
    """Every core for the processes started inside (e.g. a TP=2 engine, each rank its own core; a Slurm node's
    daemons, whose CPU count is the cores they see), beside the other worker."""
    if MY_CORES is None:
        yield
        return
    os.sched_setaffinity(0, ALL_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, MY_CORES)
