"""RoPE at given per-token positions instead of the row offset.

megatron's RotaryEmbedding returns the angles of positions 0..S-1 for every row ([S, 1, 1, d]); a row
holding a shared prompt and several samples after it needs each sample's tokens at their own positions.
Within `rope_positions`, the model's rotary embedding returns the angles at `positions` ([R, S]) as
[S, R, 1, d], which the unfused RoPE (apply_rope_fusion=False, as the builder sets) broadcasts per row.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def rope_positions(model: torch.nn.Module, positions: torch.Tensor | None):
    from rlv_megatron.train.heads import unwrap

    gpt = unwrap(model)
    rope = getattr(gpt, "rotary_pos_emb", None)
    if positions is None or rope is None:
        yield
        return
    if gpt.config.apply_rope_fusion:
        raise NotImplementedError("per-token RoPE positions need apply_rope_fusion=False")

    def at_positions(max_seq_len, *args, **kwargs):
        emb = rope.get_emb(int(positions.max()) + 1)  # [M, 1, 1, d]
        return emb[positions.t().to(emb.device), 0]  # [S, R, 1, d]

    rope.forward = at_positions
    try:
        yield
    finally:
        del rope.forward
