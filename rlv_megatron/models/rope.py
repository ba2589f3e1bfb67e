"""RoPE at given per-token positions instead of the row offset, and a vectorised THD RoPE.

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


def use_vectorised_thd_rope() -> None:
    """Swap megatron's unfused THD RoPE (a Python loop slicing the angles per sequence, each slice a separate
    op forward and backward: 6% of a tiny SFT step for 256 sequences) for one gather of the angles at every
    token's position in its sequence. Same values (tested against megatron's); context parallelism (which
    splits each sequence in two halves per rank) keeps megatron's own. Idempotent."""
    from megatron.core.models.common.embeddings import rope_utils

    original = getattr(rope_utils._apply_rotary_pos_emb_thd, "rlv_original", rope_utils._apply_rotary_pos_emb_thd)

    def thd_rope(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0,
                 cp_group=None):
        if cp_group is not None and cp_group.size() > 1:
            return original(t, cu_seqlens, freqs, rotary_interleaved, multi_latent_attention, mscale, cp_group)
        from rlv_megatron.models.varlen import sequence_ids

        T = t.shape[0]
        at = torch.arange(T, device=t.device)
        if freqs.size(0) != int(cu_seqlens[-1]):  # megatron: angles of 0..max_seqlen, restarting per sequence
            at = at - cu_seqlens.to(torch.long)[sequence_ids(cu_seqlens, T)]
        return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[at], rotary_interleaved=rotary_interleaved,
                                                     multi_latent_attention=multi_latent_attention,
                                                     mscale=mscale).squeeze(1)

    thd_rope.rlv_original = original
    rope_utils._apply_rotary_pos_emb_thd = thd_rope
