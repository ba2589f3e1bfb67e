"""Process groups from torchrun or Slurm environment variables, and megatron-core parallel state."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlv_megatron.config import ParallelConfig


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_env(environ=None) -> LaunchEnv:
    """Rank layout from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/...), else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    else:  # a lone process picks its own port, so two runs on one machine don't collide
        port = free_port() if world == 1 else 29500
    return LaunchEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(env: LaunchEnv | None = None) -> LaunchEnv:
    """gloo on CPU, nccl on GPU (one device per local rank). Idempotent."""
    env = env or launch_env()
    if dist.is_initialized():
        return env
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size)
    return env


def comm_device(group=None) -> torch.device:
    """Where a collective on `group` takes its tensors: NCCL only GPU tensors (the current device), gloo host."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all_reduce of a host (CPU) tensor on any backend: NCCL reduces only GPU tensors, so there it
    goes through the current device and back. Returns `t`."""
    if dist.get_backend(group) == "nccl":
        on_device = t.to(comm_device(group))
        dist.all_reduce(on_device, op=op, group=group)
        t.copy_(on_device.cpu())
    else:
        dist.all_reduce(t, op=op, group=group)
    return t


def init_megatron(par: ParallelConfig, seed: int = 1234, env: LaunchEnv | None = None) -> LaunchEnv:
    """Process group + CPU patches (when no GPU) + megatron parallel state + model-parallel RNG."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from rlv_megatron.models import cpu_compat

    env = init_process_group(env)
    cpu_compat.apply_if_no_gpu()
    if par.tp * par.pp > dist.get_world_size() or dist.get_world_size() % (par.tp * par.pp):
        raise ValueError(f"parallel.tp={par.tp} x parallel.pp={par.pp} does not divide the world size "
                         f"{dist.get_world_size()}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
                                     virtual_pipeline_model_parallel_size=par.vpp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return env


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
