"""The local spec's core attention through torch's scaled_dot_product_attention (CPU and non-TE GPUs).

megatron's DotProductAttention materialises the [b, heads, s, s] scores and probabilities, keeps both for the
backward and forks the RNG tracker in every layer; SDPA's fused kernels keep neither (a per-row logsumexp
instead), so attention memory is linear in the row, not quadratic. Same maths: a causal mask without an
attention mask (one sequence per row), megatron's PackedSeqParams (THD packed sequences: `models.varlen`,
attention per sequence), megatron's boolean mask, or a `models.segments` layout, computed per segment (a
shared prompt's samples).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

from rlv_megatron.models.segments import dense_mask, is_layout, segment_attention
from rlv_megatron.models.varlen import block_causal_mask, sequence_ids, varlen_attention


def thd_cu_seqlens(packed_seq_params):
    """The sequences' boundaries of a THD micro-batch (None: not packed)."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.qkv_format != "thd" or packed_seq_params.cu_seqlens_q_padded is not None:
        raise NotImplementedError("local attention: only THD packing without padded cu_seqlens")
    return packed_seq_params.cu_seqlens_q


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias (use the TE spec)")
        if self.config.attention_dropout and self.training:  # the RNG-tracked dropout
            return DenseMaskAttention.forward(self, query, key, value, attention_mask, attn_mask_type,
                                              packed_seq_params=packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # GQA: repeat K/V heads (as the parent does)
            key, value = (t.repeat_interleave(groups, dim=-2) for t in (key, value))
        cu_seqlens = thd_cu_seqlens(packed_seq_params)
        if cu_seqlens is not None:  # [T, heads, d]: megatron squeezed the dummy batch dimension
            return varlen_attention(query, key, value, cu_seqlens, self.softmax_scale)
        if is_layout(attention_mask):
            return segment_attention(query, key, value, attention_mask, self.softmax_scale)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, h] -> [b, n, s, h]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:  # megatron's boolean mask, True = masked
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale)
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, n * h]


class DenseMaskAttention(DotProductAttention):
    """megatron's own attention (stored scores): THD sequences or a `models.segments` layout become its dense
    mask."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        cu_seqlens = thd_cu_seqlens(packed_seq_params)
        if cu_seqlens is not None:  # one row [T, 1, heads, d] under the block mask
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            attention_mask = block_causal_mask(sequence_ids(cu_seqlens, query.shape[0])[None])
            packed_seq_params = None
        elif is_layout(attention_mask):
            attention_mask = dense_mask(attention_mask, query.shape[1], query.shape[0])
        return DotProductAttention.forward(self, query, key, value, attention_mask, attn_mask_type,
                                           attention_bias, packed_seq_params)
