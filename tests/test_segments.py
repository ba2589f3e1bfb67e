"""The segment layout's attention against a dense block mask built from per-token sequence and unit ids
(an independent construction)."""

import random

import pytest
import torch
import torch.nn.functional as F

from rlv_megatron.models.segments import Segment, dense_mask, encode, segment_attention


def block_causal_mask(seq, unit, shared):
    """[R, S] sequence ids (-1 padding), unit ids and shared flags -> [R, 1, S, S] True = masked: a token sees
    the earlier tokens of its own sequence and the earlier shared tokens of its unit; padding sees itself."""
    S = seq.shape[-1]
    same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
    same = (same & ~shared[:, :, None] | shared[:, None, :]) & (unit[:, :, None] == unit[:, None, :])
    allowed = (same & torch.ones(S, S, dtype=torch.bool).tril()) | torch.eye(S, dtype=torch.bool)
    return ~allowed[:, None]


def random_rows(rng: random.Random, rows: int, seq_len: int):
    """Rows of units (a shared prompt and its members, or one sequence), padded: the segments and the
    [R, S] sequence ids, unit ids and shared flags block_causal_mask reads."""
    segments, seq, unit, shared = [], torch.full((rows, seq_len), -1), torch.full((rows, seq_len), -1), \
        torch.zeros(rows, seq_len, dtype=torch.bool)
    i = u = 0
    for r in range(rows):
        at = 0
        while True:
            p = rng.choice([0, 0, rng.randint(1, 9)])
            members = [rng.randint(1, 13) for _ in range(rng.randint(2, 4) if p else 1)]
            if at + p + sum(members) > seq_len - rng.randint(0, 3):
                break
            if p:
                segments.append(Segment(r, at, at + p))
                seq[r, at:at + p], unit[r, at:at + p], shared[r, at:at + p] = i, u, True
            prefix, at = (at, at + p), at + p
            for n in members:
                segments.append(Segment(r, at, at + n, *(prefix if p else (0, 0))))
                seq[r, at:at + n], unit[r, at:at + n] = i, u
                i, at = i + 1, at + n
            u += 1
    return segments, seq, unit, shared


@pytest.mark.parametrize("seed", range(4))
def test_layout_is_the_block_mask(seed):
    rng = random.Random(seed)
    R, S = 3, 48
    segments, seq, unit, shared = random_rows(rng, R, S)
    assert torch.equal(dense_mask(encode(segments, R), R, S), block_causal_mask(seq, unit, shared))


@pytest.mark.parametrize("seed", range(3))
def test_segment_attention_equals_sdpa_with_the_dense_mask(seed):
    """Values and gradients at every real token (padding outputs differ: zero here, self-attention there,
    and no loss reads them)."""
    rng = random.Random(seed)
    R, S, heads, d = 2, 40, 3, 8
    segments, seq, unit, shared = random_rows(rng, R, S)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(S, R, heads, d, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    w = torch.randn(S, R, heads * d, generator=g, dtype=torch.float64) * (seq.t() >= 0)[..., None]
    out = segment_attention(q, k, v, encode(segments, R), scale=0.3)
    mask = block_causal_mask(seq, unit, shared)
    ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=~mask, scale=0.3)
    ref = ref.permute(2, 0, 1, 3).reshape(S, R, -1)
    real = seq.t() >= 0
    assert torch.allclose(out[real], ref[real], atol=1e-12)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-12)
