"""Where the engines live in a parallel run, and how rollouts reach the trainer's ranks.

One engine per data-parallel replica, owned by the replica's first rank (TP rank 0 of pipeline stage 0).
It generates and grades that replica's share of the step's prompts, then hands the training batch to the
replica's other ranks; rollout statistics are averaged over the replicas.

On GPU every engine's vLLM processes start with CUDA_VISIBLE_DEVICES naming its GPUs (vLLM binds its workers
to cuda:0..rollout.tensor_parallel_size-1 of what they see). Colocated (rollout.engine_gpus = 0), those are
its replica's own GPUs on the owner's node: the owner's first, then the replica's other ranks' by pipeline
stage and TP rank (`colocated_gpu_ids`), so the engines of a node never share a GPU. With
rollout.engine_gpus > 0 (disaggregated) they are GPUs of the same node that the trainer does not use: the
node's trainer ranks take its first GPUs, and the node's engine owners, in rank order, take
rollout.tensor_parallel_size GPUs each after them. Engines on other nodes than their owner's are not
supported (weights would need a cross-node transport).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlv_megatron.config import ConfigError, RolloutConfig


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


def engine_gpu_ids(node_owner_ranks: list[int], rank: int, trainer_gpus: int, node_gpus: int,
                   rollout: RolloutConfig) -> list[int]:
    """Node-local GPU indices of the engine that `rank` owns, under rollout.engine_gpus > 0: the j-th owner of
    the node (by global rank) takes rollout.tensor_parallel_size GPUs from trainer_gpus + j x that."""
    rtp, n = rollout.tensor_parallel_size, rollout.engine_gpus
    if trainer_gpus + n > node_gpus:
        raise ConfigError(f"rollout.engine_gpus={n}: this node has {node_gpus} GPUs and {trainer_gpus} trainer "
                          f"ranks, so {node_gpus - trainer_gpus} are left for engines (start fewer ranks per node)")
    if len(node_owner_ranks) * rtp > n:
        raise ConfigError(f"rollout.engine_gpus={n}: this node's {len(node_owner_ranks)} engines (one per data-"
                          f"parallel replica whose first rank is here) need {len(node_owner_ranks) * rtp} GPUs "
                          f"at rollout.tensor_parallel_size={rtp}")
    if rank not in node_owner_ranks:
        return []
    j = sorted(node_owner_ranks).index(rank)
    return list(range(trainer_gpus + j * rtp, trainer_gpus + (j + 1) * rtp))


@dataclass(frozen=True)
class RankGpu:
    """What each trainer rank reports for the placement of the engines."""
    host: str
    rank: int  # global rank
    gpu: int  # node-local index of its GPU (torch.cuda.current_device())
    engine_rank: int  # the global rank that owns its replica's engine
    pp_rank: int = 0
    tp_rank: int = 0


def colocated_gpu_ids(ranks: list[RankGpu], owner: int, rollout_tp: int) -> list[int]:
    """Node-local GPU indices of the colocated engine that `owner` owns: rollout.tensor_parallel_size GPUs of
    its replica's ranks on the owner's node, the owner's own first, then by (pipeline stage, TP rank)."""
    me = next(r for r in ranks if r.rank == owner)
    mine = sorted((r for r in ranks if r.engine_rank == owner and r.host == me.host),
                  key=lambda r: (r.pp_rank, r.tp_rank, r.rank))
    gpus = list(dict.fromkeys(r.gpu for r in mine))  # (ranks sharing a GPU give it once)
    if rollout_tp > len(gpus):
        raise ConfigError(f"rollout.tensor_parallel_size={rollout_tp}: a colocated engine runs on its replica's GPUs "
                          f"of its owner's node, and the replica of rank {owner} has {len(gpus)} on {me.host} "
                          f"(its parallel.tp x parallel.pp ranks there): set rollout.tensor_parallel_size <= "
                          f"{len(gpus)}, a larger parallel.tp, or engines on GPUs of their own (rollout.engine_gpus)")
    return gpus[:rollout_tp]


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES entries, by local index: Slurm or the user may already
    narrow (or name by UUID) the node's GPUs, and an engine's list must be given in the same terms."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [v.strip() for v in visible.split(",")]
    return [str(i) for i in range(torch.cuda.device_count())]


def own_gpu() -> str:
    """This process's current GPU as a CUDA_VISIBLE_DEVICES entry (where a trainer's IPC buffer lives)."""
    return visible_gpus()[torch.cuda.current_device()]


def _gather(me):
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        return everyone
    return [me]


def engine_devices(place: Placement, rollout: RolloutConfig) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES entries of this rank's engine on GPU (None on ranks that own none, and on CPU).
    Collective over the world on GPU."""
    if not torch.cuda.is_available():
        if rollout.engine_gpus == 0:
            return None
        raise ConfigError(f"rollout.engine_gpus={rollout.engine_gpus}: engines on GPUs of their own need GPUs "
                          "(on CPU, rollout.cpu_threads_bind gives the engine its own cores)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    me = RankGpu(socket.gethostname(), rank, torch.cuda.current_device(), place.engine_rank, place.pp_rank,
                 place.tp_rank)
    everyone = _gather(me)
    if rollout.engine_gpus == 0:  # every rank checks every engine: a refusal stops all ranks alike
        owners = [r.rank for r in everyone if r.tp_rank == 0 and r.pp_rank == 0]
        ids = {o: colocated_gpu_ids(everyone, o, rollout.tensor_parallel_size) for o in owners}.get(rank, [])
    else:
        here = [r.rank for r in everyone if r.host == me.host]
        owners = [r.rank for r in everyone if r.host == me.host and r.tp_rank == 0 and r.pp_rank == 0]
        ids = engine_gpu_ids(owners, rank, len(here), torch.cuda.device_count(), rollout)
    if not place.owns_engine:
        return None
    visible = visible_gpus()
    return [visible[i] for i in ids]
