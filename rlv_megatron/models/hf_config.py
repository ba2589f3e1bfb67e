"""Hugging Face `config.json` <-> the architecture facts a Megatron GPTModel needs.

One registry entry per model family; a family states what it reads, what it refuses, and what it writes
back on export. Unsupported features fail with the offending config field named.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class ModelArch:
    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool
    tie_word_embeddings: bool
    # Llama-3 style rope scaling factor (megatron's fixed low/high freq factors); None when absent.
    rope_scaling_factor: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    # every other `*_token_id` of the source config.json, (key, value) sorted: written back on export
    other_token_ids: tuple[tuple[str, Any], ...] = ()
    # the source's generation_config.json (load_arch), written back on export; not an architecture fact
    generation_config: dict | None = field(default=None, compare=False)


class UnsupportedConfig(ValueError):
    pass


FAMILIES: dict[str, "Family"] = {}


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    qkv_bias: bool
    extra_export_fields: Callable[[ModelArch], dict]


def register_family(model_type: str, architecture: str, qkv_bias: bool,
                    extra_export_fields: Callable[[ModelArch], dict] = lambda arch: {}) -> None:
    FAMILIES[model_type] = Family(model_type, architecture, qkv_bias, extra_export_fields)


register_family("qwen2", "Qwen2ForCausalLM", qkv_bias=True,
                extra_export_fields=lambda a: {"use_sliding_window": False, "sliding_window": None,
                                               "max_window_layers": a.num_layers})
register_family("llama", "LlamaForCausalLM", qkv_bias=False,
                extra_export_fields=lambda a: {"attention_bias": False, "mlp_bias": False,
                                               "head_dim": a.head_dim, "pretraining_tp": 1})

# Megatron's llama3 rope scaling uses these constants; other values cannot be represented.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(cfg: dict, where: str) -> tuple[float, float | None]:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        for key, want in _LLAMA3_FIXED.items():
            if float(params.get(key, want)) != float(want):
                raise UnsupportedConfig(f"{where}: rope_parameters.{key}={params.get(key)} is not supported "
                                        f"(megatron-core's llama3 rope scaling fixes it at {want})")
        return theta, float(params["factor"])
    raise UnsupportedConfig(f"{where}: rope_type={rope_type!r} is not supported (default or llama3)")


_NAMED_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def arch_from_hf(cfg: dict, where: str = "config.json") -> ModelArch:
    """Read a Hugging Face config dict; `where` names the source in error messages."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedConfig(f"{where}: model_type={model_type!r} is not supported "
                                f"(supported: {sorted(FAMILIES)})")
    fam = FAMILIES[model_type]
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfig(f"{where}: hidden_act={cfg['hidden_act']!r} (only silu/SwiGLU is supported)")
    for flag in ("mlp_bias", "use_sliding_window"):
        if cfg.get(flag):
            raise UnsupportedConfig(f"{where}: {flag}=true is not supported")
    if model_type == "llama" and cfg.get("attention_bias"):
        raise UnsupportedConfig(f"{where}: attention_bias=true is not supported for llama")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg, where)
    return ModelArch(
        family=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qkv_bias=fam.qkv_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling_factor=scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        unk_token_id=cfg.get("unk_token_id"),
        other_token_ids=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
                                     if k.endswith("_token_id") and k not in _NAMED_TOKEN_IDS)),
    )


def hf_config_from_arch(arch: ModelArch, dtype: str = "bfloat16") -> dict:
    fam = FAMILIES[arch.family]
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling_factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": arch.rope_theta, "factor": arch.rope_scaling_factor,
                **_LLAMA3_FIXED}
    return {
        "architectures": [fam.architecture],
        "model_type": arch.family,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "pad_token_id": arch.pad_token_id,
        "unk_token_id": arch.unk_token_id,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in arch.other_token_ids},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
        **fam.extra_export_fields(arch),
    }


def generation_config_from_arch(arch: ModelArch) -> dict:
    """The source's generation config, or (none there) one from the special-token ids, so that
    transformers and vLLM stop at the model's EOS and pad with its pad id."""
    if arch.generation_config is not None:
        return arch.generation_config
    ids = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id, "pad_token_id": arch.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedConfig(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def load_arch(model_dir: str | Path) -> ModelArch:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    arch = arch_from_hf(_read_json(path), where=str(path))
    gen = Path(model_dir) / "generation_config.json"
    return replace(arch, generation_config=_read_json(gen)) if gen.is_file() else arch


def arch_dict(arch: ModelArch) -> dict:
    return asdict(arch)
