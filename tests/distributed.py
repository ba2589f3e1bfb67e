"""Run a function on N gloo ranks (mp.spawn) and collect what each rank returns."""

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def _entry(rank, world, port, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        result = (fn(*args), None)
    except BaseException:
        result = (None, traceback.format_exc())
    finally:
        from rlv_megatron import dist

        dist.destroy()
    # a file, not a queue: a large result would block a pipe that nobody reads until join
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    if result[1]:
        raise SystemExit(1)


def run_distributed(fn, world_size, *args):
    """fn(*args) on each rank; returns the per-rank results in rank order (fn must be importable)."""
    from rlv_megatron.dist import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
                               join=True, start_method="spawn")
        except mp.ProcessRaisedException:
            pass
        except mp.ProcessExitedException:
            pass  # the rank's own report below says why
        reports = [pickle.loads(p.read_bytes()) if (p := Path(out_dir, f"{r}.pkl")).exists() else None
                   for r in range(world_size)]
        for rank, rep in enumerate(reports):  # a rank's own error first: the others were killed because of it
            if rep is not None and rep[1]:
                raise RuntimeError(f"rank {rank} failed:\n{rep[1]}")
        for rank, rep in enumerate(reports):
            if rep is None:
                raise RuntimeError(f"rank {rank} died without a result")
        return [rep[0] for rep in reports]


def _in_turn(fn, calls):
    """fn(*args) for each args of `calls` in this one process group, megatron's parallel state built anew for
    each (a new layout: tp, pp, vpp); seeds are set again by every init_megatron."""
    from megatron.core import parallel_state as ps

    out = []
    for args in calls:
        out.append(fn(*args))
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    return out


def run_distributed_in_turn(fn, world_size, calls: list[tuple]) -> list[list]:
    """run_distributed for several calls in one spawn (start-up, mostly imports, is most of a small call's
    time): each call's per-rank results, in the order of `calls`."""
    by_rank = run_distributed(_in_turn, world_size, fn, calls)
    return [[rank[i] for rank in by_rank] for i in range(len(calls))]
