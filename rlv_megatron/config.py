"""Typed config schemas (dataclasses). Hydra composes YAML into these; `validate` names the bad field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (e.g. `parallel.tp`)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved schedule)
    sequence_parallel: bool = False


@dataclass
class ModelConfig:
    path: Optional[str] = None  # Hugging Face model directory to start from
    impl: str = "auto"  # auto | local | te  (TransformerEngine spec; auto picks te when importable on GPU)
    params_dtype: str = "float32"  # float32 | bfloat16
    fp8: Optional[str] = None  # None | e4m3 | hybrid   (te only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    make_vocab_size_divisible_by: int = 128
    seed: int = 1234


@dataclass
class RolloutConfig:
    dtype: str = "bfloat16"  # the engine's weights; syncs cast Megatron's weights to it
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.4  # GPU only: the engine's share, colocated with training
    cpu_kv_cache_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE
    weight_bucket_mb: int = 256  # bytes per weight-sync bucket (bounds the extra memory of a sync)
    transport: str = "auto"  # auto | shm | cuda_ipc
    shm_dir: str = "/dev/shm"
    enable_sleep_mode: bool = False  # GPU only: free engine memory during training
    enforce_eager: bool = True
    seed: int = 0
    # "processed_logprobs": log-probs of the distribution actually sampled from (after temperature/top-p);
    # "raw_logprobs": the model's, before sampling transforms.
    logprobs_mode: str = "processed_logprobs"
    logprobs_topk: int = 20  # verifier scoring: a "Yes" outside the top-k counts as P=0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


_CHOICES = {
    "model.impl": ("auto", "local", "te"),
    "model.params_dtype": ("float32", "bfloat16"),
    "model.fp8": (None, "e4m3", "hybrid"),
    "model.fp8_recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
    "rollout.dtype": ("float32", "bfloat16", "float16"),
    "rollout.transport": ("auto", "shm", "cuda_ipc"),
    "rollout.logprobs_mode": ("processed_logprobs", "raw_logprobs"),
}


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config, arch=None) -> None:
    """Check choices, positivity and divisibility against the model architecture (when given)."""
    for name, allowed in _CHOICES.items():
        if _get(cfg, name) not in allowed:
            raise ConfigError(f"{name}={_get(cfg, name)!r}: must be one of {allowed}")
    for name in ("parallel.tp", "parallel.pp", "rollout.tensor_parallel_size", "rollout.weight_bucket_mb",
                 "rollout.max_model_len", "model.make_vocab_size_divisible_by"):
        if int(_get(cfg, name)) < 1:
            raise ConfigError(f"{name}={_get(cfg, name)}: must be >= 1")
    p = cfg.parallel
    if p.vpp is not None and (p.vpp < 1 or p.pp < 2):
        raise ConfigError(f"parallel.vpp={p.vpp}: needs parallel.pp >= 2 and vpp >= 1")
    if p.sequence_parallel and p.tp < 2:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp >= 2")
    if cfg.model.fp8 is not None and cfg.model.impl == "local":
        raise ConfigError("model.fp8 needs model.impl=te (TransformerEngine); the local spec has no FP8")
    if arch is None:
        return
    if arch.num_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp}: num_attention_heads={arch.num_heads} is not divisible by it")
    if arch.num_kv_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp}: num_key_value_heads={arch.num_kv_heads} is not divisible by it")
    if arch.ffn_hidden_size % p.tp:
        raise ConfigError(f"parallel.tp={p.tp}: intermediate_size={arch.ffn_hidden_size} is not divisible by it")
    stages = p.pp * (p.vpp or 1)
    if arch.num_layers % stages:
        raise ConfigError(f"parallel.pp={p.pp} x parallel.vpp={p.vpp}: num_hidden_layers={arch.num_layers} "
                          f"is not divisible by {stages}")
    rtp = cfg.rollout.tensor_parallel_size
    if arch.num_heads % rtp:
        raise ConfigError(f"rollout.tensor_parallel_size={rtp}: num_attention_heads={arch.num_heads} "
                          "is not divisible by it")
