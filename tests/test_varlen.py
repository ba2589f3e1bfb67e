"""THD attention of the local spec (models.varlen) against SDPA under the dense block-diagonal causal mask."""

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlv_megatron.models.varlen import block_causal_mask, sequence_ids, varlen_attention


def test_block_causal_mask_and_sequence_ids():
    m = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    assert m.shape == (1, 1, 6, 6)
    allowed = ~m[0, 0]
    assert allowed[1, 0] and not allowed[0, 1]  # causal within a sequence
    assert not allowed[2, 1] and allowed[4, 2]  # no attention across sequences
    assert allowed[5, 5] and not allowed[5, 4]  # padding sees itself only
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    assert sequence_ids(cu, 6).tolist() == [0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize("seed", range(4))
def test_varlen_attention_equals_sdpa_with_the_block_mask(seed):
    """Values and gradients, float64, lengths from 1 to 70 (several buckets, some of one sequence)."""
    rng = random.Random(seed)
    lens = [rng.choice([1, 2, rng.randint(3, 20), rng.randint(21, 70)]) for _ in range(rng.randint(1, 12))]
    T, heads, d = sum(lens), 3, 8
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, heads, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(T, heads * d, generator=g, dtype=torch.float64)
    out = varlen_attention(q, k, v, cu, scale=0.3)
    # the reference mask written here from the lengths, not by the module under test: token i of a sequence
    # starting at s sees tokens s..i (True = attend, SDPA's boolean attn_mask convention)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    start = 0
    for n in lens:
        for i in range(start, start + n):
            allowed[i, start:i + 1] = True
        start += n
    ref = F.scaled_dot_product_attention(*(t.permute(1, 0, 2)[None] for t in (q, k, v)), attn_mask=allowed, scale=0.3)
    ref = ref[0].permute(1, 0, 2).reshape(T, -1)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("exact_positions", [False, True], ids=["restart_per_sequence", "offsets"])
def test_vectorised_thd_rope_equals_megatrons(exact_positions):
    """models.rope's one-gather THD RoPE against megatron's per-sequence loop (kept as rlv_original); fails
    if megatron's internal moves."""
    from megatron.core.models.common.embeddings import rope_utils

    from rlv_megatron.models.rope import use_vectorised_thd_rope

    use_vectorised_thd_rope()
    fast = rope_utils._apply_rotary_pos_emb_thd
    lens = [3, 9, 1, 14, 6]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    T = sum(lens)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(T, 2, 16, generator=g, dtype=torch.float64)
    freqs = torch.randn(T if exact_positions else max(lens), 1, 1, 16, generator=g, dtype=torch.float64)
    group = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    assert torch.equal(fast(t, cu, freqs, cp_group=group), fast.rlv_original(t, cu, freqs, cp_group=group))
