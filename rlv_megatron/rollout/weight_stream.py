"""Weight sync from the trainer's shards to the replica's engine.

All ranks of a pipeline stage gather its TP shards (each takes part); each later stage streams its tensors
to the engine rank point-to-point, one tensor at a time, so no rank ever holds more than one full tensor
beyond its own shard.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

import rlv_megatron.dist as rlv_dist
from rlv_megatron.rollout.placement import Placement

_END = "__end_of_stage__"


def stream_weights(policy, place: Placement) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of the whole model, in stage order, yielded on the engine rank. Every rank must
    exhaust it (it drives the TP gathers and pipeline sends); other ranks get nothing."""
    for stage in range(place.pp_size):
        if stage == place.pp_rank:
            for name, t in policy.hf_tensors():  # TP all-gather within this stage
                if place.owns_engine:
                    yield name, t
                elif place.tp_rank == 0:
                    _send(name, t, place.engine_rank)
            if place.tp_rank == 0 and not place.owns_engine:
                _send(_END, None, place.engine_rank)
        elif place.owns_engine:
            src = _stage_rank(stage)
            while (item := _recv(src)) is not None:
                yield item


def _stage_rank(stage: int) -> int:
    """Global rank of TP rank 0 of `stage` in the caller's pipeline."""
    from megatron.core import parallel_state as ps

    return dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[stage]


def _send(name: str, t: torch.Tensor | None, dst: int) -> None:
    header = [name, None if t is None else (tuple(t.shape), t.dtype)]
    dist.send_object_list(header, dst=dst)
    if t is not None:
        dist.send(t.contiguous(), dst=dst)


def _recv(src: int):
    header = [None, None]
    dist.recv_object_list(header, src=src)
    name, meta = header
    if name == _END:
        return None
    t = torch.empty(meta[0], dtype=meta[1], device=rlv_dist.comm_device())  # NCCL receives on the GPU
    dist.recv(t, src=src)
    return name, t
