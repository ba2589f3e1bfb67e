"""Attention over the segments of a row, without a dense [S, S] mask.

A row of a micro-batch can hold a shared prompt and the samples after it (train.share_prompts; packed rows
of many short sequences use train.packing's block mask, faster there). Each run of a row's tokens that
belongs to one sequence is a segment: its tokens attend
causally within it and to all of an optional prefix run (its unit's shared prompt). Computed per segment,
attention costs sum(segment x (prefix + segment)) instead of S x S and needs no [S, S] mask: segments of
about the same length (a power-of-two bucket) are gathered into [N, Lq] queries and [N, Lk] keys, one SDPA
call per bucket. Padding tokens belong to no segment: their attention output is zero.

The layout travels through megatron as the attention mask (its activation recompute saves only tensors): one
int64 tensor, written by `encode` and read by `decode`; `dense_mask` turns it into megatron's boolean mask
for cores that need one (DotProductAttention, the stored-scores reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segment:
    row: int
    start: int  # [start, end): the segment's tokens in the row
    end: int
    prefix_start: int = 0  # [prefix_start, prefix_end): tokens every token of the segment also sees
    prefix_end: int = 0


def encode(segments: list[Segment], rows: int) -> torch.Tensor:
    """The layout as one int64 tensor: [buckets, then per bucket N, Lq, Lk, prefix lengths (N), query token
    indices (N x Lq), key token indices (N x Lk)], token index = position x rows + row (megatron's [S, R]
    order), -1 = padding."""
    buckets: dict[int, list[Segment]] = {}
    for s in segments:
        buckets.setdefault((s.end - s.start - 1).bit_length(), []).append(s)
    out = [torch.tensor([len(buckets)])]
    for segs in buckets.values():
        lq = max(s.end - s.start for s in segs)
        lk = max(s.prefix_end - s.prefix_start + s.end - s.start for s in segs)
        q = torch.full((len(segs), lq), -1, dtype=torch.long)
        k = torch.full((len(segs), lk), -1, dtype=torch.long)
        for n, s in enumerate(segs):
            own = torch.arange(s.start, s.end) * rows + s.row
            keys = torch.cat([torch.arange(s.prefix_start, s.prefix_end) * rows + s.row, own])
            q[n, :len(own)], k[n, :len(keys)] = own, keys
        out += [torch.tensor([len(segs), lq, lk, *(s.prefix_end - s.prefix_start for s in segs)]), q.flatten(),
                k.flatten()]
    return torch.cat(out)


def is_layout(mask: torch.Tensor | None) -> bool:
    return mask is not None and mask.dtype == torch.long and mask.dim() == 1


def decode(layout: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per bucket: query indices [N, Lq], key indices [N, Lk] and allowed [N, Lq, Lk] (True = attend). A
    padding query slot may attend to its first key, so that no softmax row is empty."""
    head = layout.tolist()
    out, at = [], 1
    for _ in range(head[0]):
        n, lq, lk = head[at:at + 3]
        plen = layout[at + 3:at + 3 + n]
        at += 3 + n
        q = layout[at:at + n * lq].view(n, lq)
        k = layout[at + n * lq:at + n * (lq + lk)].view(n, lk)
        at += n * (lq + lk)
        j, a = torch.arange(lk, device=layout.device), torch.arange(lq, device=layout.device)
        own = j[None, None, :] - plen[:, None, None]  # a key's index within the segment (< 0: prefix)
        allowed = (k[:, None, :] >= 0) & (own <= a[None, :, None]) & (q[:, :, None] >= 0)
        allowed[:, :, 0] |= q < 0
        out.append((q, k, allowed))
    return out


def dense_mask(layout: torch.Tensor, rows: int, seq_len: int) -> torch.Tensor:
    """megatron's [R, 1, S, S] boolean mask (True = masked) with the layout's attention; a padding token sees
    itself."""
    allowed = torch.eye(seq_len, dtype=torch.bool, device=layout.device).repeat(rows, 1, 1)
    for q, k, ok in decode(layout):
        n, i, j = ok.nonzero(as_tuple=True)
        qi, ki = q[n, i], k[n, j]
        keep = qi >= 0
        qi, ki = qi[keep], ki[keep]
        allowed[qi % rows, qi // rows, ki // rows] = True
    return ~allowed[:, None]


def segment_attention(query, key, value, layout: torch.Tensor, scale: float | None) -> torch.Tensor:
    """query, key, value [S, R, heads, d] (key/value heads already repeated to the query's) -> [S, R, heads x d]."""
    S, R, n, d = query.shape
    flat = [t.reshape(S * R, n, d) for t in (query, key, value)]
    out = query.new_zeros(S * R, n, d)
    for q, k, allowed in decode(layout):
        # index_select: its backward is an index_add, cheaper than advanced indexing's accumulating index_put
        qs, ks, vs = (t.index_select(0, i.clamp(min=0).flatten()).view(*i.shape, n, d).transpose(1, 2)
                      for t, i in zip(flat, (q, k, k)))  # [N, heads, L, d]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed[:, None], scale=scale)
        valid = q >= 0
        out = out.index_copy(0, q[valid], o.transpose(1, 2)[valid])
    return out.view(S, R, n * d)
