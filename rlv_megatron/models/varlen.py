"""Attention over THD packed sequences (megatron's PackedSeqParams: tokens end to end, `cu_seqlens` marking
where each sequence starts) for the local spec, the CPU counterpart of TransformerEngine's THD attention.

Each sequence attends causally to itself only, with no [T, T] mask: sequences of about the same length (a
power-of-two bucket) are gathered into one right-padded [N, L] batch and go through one causal SDPA call.
Right padding needs no mask under causal attention (a real query never sees a later slot), so SDPA keeps its
fused kernel. Cost is sum(L_bucket^2) per bucket, memory linear in the tokens: the block-diagonal mask's
[T, T] never exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] index of the sequence each token belongs to."""
    starts = cu_seqlens[1:-1].to(torch.long)
    return torch.bucketize(torch.arange(total, device=cu_seqlens.device), starts, right=True)


def block_causal_mask(seq: torch.Tensor) -> torch.Tensor:
    """[R, S] sequence ids -> megatron's [R, 1, S, S] boolean mask (True = masked): each token sees the earlier
    tokens of its own sequence (a token with id -1, padding, sees itself, so no softmax row is empty)."""
    S = seq.shape[-1]
    same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
    allowed = (same & torch.ones(S, S, dtype=torch.bool, device=seq.device).tril()) \
        | torch.eye(S, dtype=torch.bool, device=seq.device)
    return ~allowed[:, None]


def _buckets(cu_seqlens: torch.Tensor):
    """Per bucket: token indices [N, L] (right padding repeats the sequence's first token) and the slots of
    the flattened buckets where each token's output lands ([T], in token order)."""
    cu = cu_seqlens.to(torch.long)
    lens = (cu[1:] - cu[:-1]).tolist()
    by_size: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        if n:
            by_size.setdefault((n - 1).bit_length(), []).append(i)
    total = int(cu[-1])
    slot = torch.empty(total, dtype=torch.long, device=cu.device)
    out, offset = [], 0
    for members in by_size.values():
        m = torch.tensor(members, device=cu.device)
        n_max = max(lens[i] for i in members)
        j = torch.arange(n_max, device=cu.device)
        start, length = cu[m], cu[m + 1] - cu[m]
        real = j[None, :] < length[:, None]
        index = torch.where(real, start[:, None] + j[None, :], start[:, None])
        slot[index[real]] = offset + torch.arange(len(members) * n_max, device=cu.device).view(-1, n_max)[real]
        out.append(index)
        offset += len(members) * n_max
    return out, slot


def varlen_attention(query, key, value, cu_seqlens: torch.Tensor, scale: float | None) -> torch.Tensor:
    """query, key, value [T, heads, d] (K/V heads already repeated) -> [T, heads x d]; causal within each
    sequence of `cu_seqlens` ([sequences + 1], the last entry T)."""
    T, n, d = query.shape
    qkv = torch.stack((query, key, value))  # one gather (and one index_add backward) per bucket
    outs = []
    buckets, slot = _buckets(cu_seqlens)
    for index in buckets:
        N, L = index.shape
        q, k, v = qkv.index_select(1, index.flatten()).view(3, N, L, n, d).transpose(2, 3).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # [N, n, L, d]
        outs.append(o.transpose(1, 2).reshape(N * L, n, d))
    return torch.cat(outs).index_select(0, slot).reshape(T, n * d)
