"""Hugging Face <-> megatron-core weights for the Qwen2/Llama families, at any TP/PP/VPP.

Three layers of representation:
  HF names            model.layers.3.self_attn.q_proj.weight ...
  full Megatron       decoder.layers.3.self_attention.linear_qkv.weight (global layer index, unsharded,
                      fused QKV in Megatron's grouped layout, fc1 = [gate; up], vocab padded)
  a rank's shard      what a TP rank holds of a full tensor (module-local layer index inside its chunk)
Each step is a per-tensor function, so import reads only what a rank needs and export streams.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from rlv_megatron.models.hf_config import ModelArch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# TransformerEngine's spec fuses the norms into the following linear; canonical names are the local spec's.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LOCAL_TO_TE = {v: k for k, v in _TE_TO_LOCAL.items()}

# Per-layer tensors with a one-to-one HF counterpart.
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# How a full Megatron tensor is split over TP: dim 0 (column parallel), dim 1 (row parallel), or replicated.
_ROW_SPLIT = ("linear_proj.weight", "linear_fc2.weight")
_COL_SPLIT = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")


def canonical(name: str) -> str:
    m = _LAYER.match(name)
    if m and m.group(2) in _TE_TO_LOCAL:
        return f"decoder.layers.{m.group(1)}.{_TE_TO_LOCAL[m.group(2)]}"
    return name


# ---- HF <-> full Megatron -------------------------------------------------------------------------

def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] > padded:
        raise ValueError(f"vocab rows {t.shape[0]} exceed the padded vocab size {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """HF q/k/v (weights [out, H] or biases [out]) -> Megatron's [groups x (q heads, k, v) x head_dim]."""
    g, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // g
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(g, per * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1)
    return fused.reshape(-1, *tail)


def split_qkv(fused: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // g
    tail = fused.shape[1:]
    grouped = fused.reshape(g, (per + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def mcore_from_hf(name: str, get: Callable[[str], torch.Tensor], arch: ModelArch, padded_vocab: int) -> torch.Tensor:
    """The full Megatron tensor `name` (canonical, global layer index), read through `get(hf_name)`."""
    if name == "embedding.word_embeddings.weight":
        return _pad_vocab(get("model.embed_tokens.weight"), padded_vocab)
    if name == "output_layer.weight":
        src = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return _pad_vocab(get(src), padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no Hugging Face counterpart for Megatron tensor {name!r}")
    hf = f"model.layers.{m.group(1)}."
    rest = m.group(2)
    if rest in _LAYER_SIMPLE:
        return get(hf + _LAYER_SIMPLE[rest])
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return fuse_qkv(*(get(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"), arch)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])
    raise KeyError(f"no Hugging Face counterpart for Megatron tensor {name!r}")


def hf_from_mcore(name: str, full: torch.Tensor, arch: ModelArch) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one full Megatron tensor; [] for tensors HF does not store."""
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", full[: arch.vocab_size])]
    if name == "output_layer.weight":
        return [] if arch.tie_word_embeddings else [("lm_head.weight", full[: arch.vocab_size])]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", full)]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no Hugging Face counterpart for Megatron tensor {name!r}")
    hf = f"model.layers.{m.group(1)}."
    rest = m.group(2)
    if rest in _LAYER_SIMPLE:
        return [(hf + _LAYER_SIMPLE[rest], full)]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return [(f"{hf}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", split_qkv(full, arch))]
    if rest == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2)
        return [(hf + "mlp.gate_proj.weight", gate), (hf + "mlp.up_proj.weight", up)]
    raise KeyError(f"no Hugging Face counterpart for Megatron tensor {name!r}")


# ---- full Megatron <-> TP shards ------------------------------------------------------------------

def tp_split_dim(name: str) -> int | None:
    if name.endswith(_COL_SPLIT) or name.endswith("linear_fc1.weight"):
        return 0
    if name.endswith(_ROW_SPLIT):
        return 1
    return None


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    if tp == 1 or tp_split_dim(name) is None:
        return full
    if name.endswith("linear_fc1.weight"):  # each rank holds [its gate rows; its up rows]
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
    return full.chunk(tp, dim=tp_split_dim(name))[tp_rank]


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1 or tp_split_dim(name) is None:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=tp_split_dim(name))


# ---- a rank's model chunks ------------------------------------------------------------------------

def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Module-local state-dict name -> canonical global name (megatron's own layer_number decides); the
    language model's tensors only (a classification verifier head travels on its own: models/verifier_head.py)."""
    layer_number = {}
    decoder = getattr(chunk, "decoder", None)
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            layer_number[str(i)] = layer.layer_number - 1
    out = {}
    for name in chunk.state_dict():
        if name.endswith("_extra_state") or name.startswith("verifier_head."):  # the head is not the LM's
            continue
        m = _LAYER.match(name)
        if m:
            out[name] = canonical(f"decoder.layers.{layer_number[m.group(1)]}.{m.group(2)}")
        else:
            out[name] = name
    return out


@torch.no_grad()
def load_hf_into_chunks(chunks: list[torch.nn.Module], get: Callable[[str], torch.Tensor], arch: ModelArch,
                        padded_vocab: int, tp_rank: int, tp: int) -> int:
    """Copy HF weights into this rank's chunks; returns the number of tensors loaded."""
    n = 0
    for chunk in chunks:
        state = chunk.state_dict(keep_vars=True)
        for local, name in global_names(chunk).items():
            full = mcore_from_hf(name, get, arch, padded_vocab)
            part = shard(name, full, tp_rank, tp)
            target = state[local]
            if part.shape != target.shape:
                raise ValueError(f"{name}: shard shape {tuple(part.shape)} != model's {tuple(target.shape)} "
                                 f"(tp_rank {tp_rank}/{tp})")
            target.copy_(part)
            n += 1
    return n


def iter_full_tensors(chunks: list[torch.nn.Module], tp_group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical global name, full tensor) for this rank's chunks, gathering TP shards.

    Collective over `tp_group` when it has more than one rank: all its ranks must iterate together."""
    import torch.distributed as dist

    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    for chunk in chunks:
        state = chunk.state_dict()
        for local, name in global_names(chunk).items():
            t = state[local].detach()
            if tp > 1 and tp_split_dim(name) is not None:
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                t = unshard(name, parts)
            yield name, t


def iter_hf_tensors(chunks: list[torch.nn.Module], arch: ModelArch, tp_group=None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of this rank's pipeline stage(s), in layer order (streams: one tensor at a time).
    They may be views of the parameters (no copy): consumers cast/copy them as they need."""
    for name, full in iter_full_tensors(chunks, tp_group):
        yield from hf_from_mcore(name, full, arch)
