"""Checkpoints: megatron dist_checkpointing of the model, the optimizer, per-rank RNG and the run position.

Written atomically: every rank saves into a hidden temporary directory, rank 0 then writes a manifest (each
file and its size), renames the directory to `step_NNNNNNNN` and only then points `latest` at it. A crash at
any moment leaves the previous checkpoint complete and `latest` naming it. Loading checks the manifest first,
so a truncated or partly deleted checkpoint fails with the file named, not deep inside torch.

Tensors are saved by their global names, so a checkpoint resumes under any TP/PP/DP layout (saved at TP=2,
resumed at TP=1). RNG states are restored only under the same layout; nothing in a step depends on them
(rollouts and mini-batch order are seeded per step), they are kept for custom code that draws randomness.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from rlv_megatron.atomic import atomic_write_text

LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


def _layout() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    from megatron.core import parallel_state as ps

    return ((ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank()))


def _rng_object(loading: bool):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape, offset = _layout()
    state = None if loading else {"torch": torch.get_rng_state(), "python": random.getstate()}
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _chunk_key(name: str, i: int, n: int) -> str:
    return name if n == 1 else f"{name}{i}"


def _sync_param_index_map(optimizer) -> None:
    """A megatron-core 0.16.1 bug, on GPU as much as here (NVIDIA/Megatron-LM issue 2777, fixed upstream by PR
    5835): DistributedOptimizer._build_optimizer_group_ranges numbers each parameter's place in its optimizer
    group in grad-buffer order, but _build_model_and_main_param_groups then installs every group's shards
    fp32 parameters first, 16-bit ones after. In a group that mixes the two (under bfloat16 our local-spec
    norm weights stay float32, beside bfloat16 biases in the no-weight-decay group) the map points at another
    parameter's shard: the checkpoint's get_parameter_state_dp_zero fails ("size of tensor a (256) must match
    the size of tensor b (128)"), or, where sizes agree, saves and loads the states of the wrong parameter.
    Training is unaffected (it pairs the lists themselves). Renumber in the installed order (idempotent, no
    change for single-dtype groups)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "model_fp32_groups"):  # megatron FSDP, stubs, the non-distributed optimizers
            continue
        opt.model_param_group_index_map = {
            p: (g, i) for g, (fp32, f16) in enumerate(zip(opt.model_fp32_groups, opt.model_float16_groups))
            for i, p in enumerate([*fp32, *f16])}


def _sharded_state(policy, loading: bool, with_rng: bool, with_optimizer: bool = True) -> dict:
    chunks = policy.model_chunks
    model = {_chunk_key("model", i, len(chunks)): c.sharded_state_dict() for i, c in enumerate(chunks)}
    # fully_reshardable: optimizer states in the canonical per-parameter layout, so any TP/PP/DP can load them
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}
    state = dict(model)
    if with_optimizer:
        _sync_param_index_map(policy.optimizer)
        state["optimizer"] = policy.optimizer.sharded_state_dict(model, is_loading=loading, metadata=meta)
    if with_rng:
        state["rng"] = _rng_object(loading)
    for i, c in enumerate(policy.reference or []):  # the KL reference (the policy after the warm start)
        state[_chunk_key("reference", i, len(chunks))] = c.sharded_state_dict(prefix="reference.")
    return state


def _materialise_optimizer_states(optimizer) -> None:
    """torch's Adam creates its states at the first step; megatron's distributed optimizer (without apex/TE)
    needs them to exist to save or load a checkpoint. Create them as a fresh Adam would hold them (zero
    moments, step 0) with megatron's dummy step at lr 0, which leaves the weights alone."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_init_optimizer_states_with_dummy_values") or opt.optimizer.state:
            continue
        lrs = [g["lr"] for g in opt.optimizer.param_groups]
        for g in opt.optimizer.param_groups:
            g["lr"] = 0.0
        opt._init_optimizer_states_with_dummy_values()
        for g, lr in zip(opt.optimizer.param_groups, lrs):
            g["lr"] = lr
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _in_process_write_results():
    """megatron's FileSystemWriterAsync collects write results in a queue it gets from a *spawned*
    multiprocessing Manager (filesystem_async._get_write_results_queue). The spawned server re-imports
    __main__: from a script without `if __name__ == "__main__":` it re-runs the script (under torchrun it
    hangs in the rendezvous, the caller in Manager.start(), silently). A synchronous save puts and gets that
    queue in this process (the writers themselves are forked), so an in-process queue does the same job."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    saved = fa._results_queue
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = saved


def save(policy, root: str | Path, step: int, run_state: dict, keep: int = 2, extras: dict | None = None) -> Path:
    """Collective: every rank calls it. `run_state`: JSON-able position of the run (step, phase, ...);
    `extras`: this rank's objects to keep beside it (name -> picklable; names unique over ranks; `load_extra`).
    Once it is complete, older checkpoints beyond the `keep` newest go (`prune`; keep=0 keeps all)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _materialise_optimizer_states(policy.optimizer)  # a save before the first step
    state = _sharded_state(policy, loading=False, with_rng=True)
    state["run"] = {**run_state, "step": step}
    with _in_process_write_results():
        dist_checkpointing.save(state, str(tmp))
    for name, obj in (extras or {}).items():
        torch.save(obj, tmp / f"{name}.pt")
    _barrier()
    if _rank0():
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        manifest = {"step": step, "layout_pp_tp_dp": list(_layout()[0]), "files": files}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # a same-step leftover of an earlier, resumed run
        os.rename(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        if keep > 0:
            prune(root, keep, step)
    _barrier()
    return final


def prune(root: Path, keep: int, step: int) -> None:
    """After the checkpoint of `step` is complete: keep it and the keep-1 newest before it. Later-numbered
    ones are an abandoned run's (train.resume=false) that `latest` no longer names; they go too (sorting
    by name alone would delete the new checkpoint instead)."""
    saved = sorted(p for p in Path(root).glob("step_*") if p.name[5:].isdigit())
    mine = [p for p in saved if int(p.name[5:]) <= step]
    for old in [p for p in saved if p not in mine] + mine[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    verify(path)
    return path


def verify(path: str | Path) -> dict:
    """Raise CheckpointError naming the first missing or truncated file; return the manifest."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{path}: not a complete checkpoint ({MANIFEST} missing: the save did not finish)")
    try:
        info = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest}: unreadable ({e})") from e
    for name, size in info["files"].items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{path}: file {name} is missing (checkpoint incomplete)")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: file {name} has {f.stat().st_size} bytes, the manifest says {size} "
                                  "(truncated)")
    return info


def params_dtype(path: str | Path) -> str:
    """The dtype the checkpoint's model was trained in (model.params_dtype): its saved weights' dtype."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(path))  # reads the metadata only, no tensors
    numel: dict = {}  # by element count: under bfloat16, megatron keeps the norm weights in float32
    for k, t in meta.items():
        if not k.startswith(("optimizer.", "reference.")):
            numel[t.dtype] = numel.get(t.dtype, 0) + math.prod(t.global_shape)
    return str(max(numel, key=numel.get)).removeprefix("torch.")


def load_extra(path: str | Path, name: str):
    """An object `save` kept under `name` (its file is in the manifest, so `verify` has checked it)."""
    return torch.load(Path(path) / f"{name}.pt", weights_only=False)


def load(policy, path: str | Path, optimizer: bool = True) -> dict:
    """Collective: load weights (and optimizer states, and the KL reference when the policy has one: call
    freeze_reference first) into `policy` under its own layout; returns run_state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    same_layout = verify(path)["layout_pp_tp_dp"] == list(_layout()[0])
    if optimizer:
        _materialise_optimizer_states(policy.optimizer)
    state = _sharded_state(policy, loading=True, with_rng=same_layout, with_optimizer=optimizer)
    loaded = dist_checkpointing.load(state, str(path))
    n = len(policy.model_chunks)
    for i, c in enumerate(policy.model_chunks):
        c.load_state_dict(loaded[_chunk_key("model", i, n)])
    for i, c in enumerate(policy.reference or []):
        ref = loaded[_chunk_key("reference", i, n)]
        c.load_state_dict({k.removeprefix("reference."): v for k, v in ref.items()})
    if optimizer:
        policy.optimizer.load_state_dict(loaded["optimizer"])
    if same_layout and loaded.get("rng") is not None:
        torch.set_rng_state(loaded["rng"]["torch"])
        random.setstate(loaded["rng"]["python"])
    return loaded["run"]

