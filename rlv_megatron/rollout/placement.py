"""Where the engines live in a parallel run, and how rollouts reach the trainer's ranks.

One engine per data-parallel replica, owned by the replica's first rank (TP rank 0 of pipeline stage 0).
It generates and grades that replica's share of the step's prompts, then hands the training batch to the
replica's other ranks; rollout statistics are averaged over the replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Placement:
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    pp_size: int = 1
    engine_rank: int = 0  # global rank that owns this replica's engine

    @property
    def owns_engine(self) -> bool:
        return self.tp_rank == 0 and self.pp_rank == 0

    @staticmethod
    def current() -> "Placement":
        from megatron.core import parallel_state as ps

        if not dist.is_initialized() or not ps.model_parallel_is_initialized():
            return Placement()
        mp_ranks = dist.get_process_group_ranks(ps.get_model_parallel_group())
        return Placement(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                         ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                         ps.get_pipeline_model_parallel_world_size(), min(mp_ranks))


def my_share(items: list, place: Placement) -> list:
    """This replica's contiguous share of a step's prompts (every replica gets the same count)."""
    if len(items) % place.dp_size:
        raise ValueError(f"algo.prompts_per_step={len(items)} is not divisible by the data-parallel size "
                         f"{place.dp_size}")
    n = len(items) // place.dp_size
    return items[place.dp_rank * n:(place.dp_rank + 1) * n]


def share_from_engine(obj, place: Placement):
    """The engine rank's `obj` on every rank of its model-parallel group (None elsewhere on input)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or dist.get_world_size(ps.get_model_parallel_group()) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=place.engine_rank, group=ps.get_model_parallel_group())
    return box[0]


def dp_mean(values: dict, place: Placement) -> dict:
    """Mean of the engine ranks' rollout statistics over data-parallel replicas (None: missing in a replica,
    averaged over those that have it). Collective over the engine ranks' data-parallel group."""
    from megatron.core import parallel_state as ps

    from rlv_megatron.dist import all_reduce_host

    if place.dp_size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([[0.0 if values[k] is None else float(values[k]), values[k] is not None] for k in keys],
                     dtype=torch.float64)
    all_reduce_host(t, ps.get_data_parallel_group())  # host statistics (NCCL: through the GPU)
    return {k: (s / n if n else None) for k, (s, n) in zip(keys, t.tolist())}
