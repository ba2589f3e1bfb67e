"""The local spec's core attention through torch's scaled_dot_product_attention (CPU and non-TE GPUs).

megatron's DotProductAttention materialises the [b, heads, s, s] scores and probabilities, keeps both for the
backward and forks the RNG tracker in every layer; SDPA's fused kernels keep neither (a per-row logsumexp
instead), so attention memory is linear in the row, not quadratic. Same maths: a causal mask without an
attention mask (one sequence per row), megatron's boolean mask (packed rows), or a `models.segments`
layout, computed per segment (a shared prompt's samples).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

from rlv_megatron.models.segments import dense_mask, is_layout, segment_attention


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed_seq_params / attention_bias (use the TE spec)")
        if self.config.attention_dropout and self.training:  # the RNG-tracked dropout
            return DenseMaskAttention.forward(self, query, key, value, attention_mask, attn_mask_type)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # GQA: repeat K/V heads (as the parent does)
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
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
    """megatron's own attention (stored scores): a `models.segments` layout becomes its dense mask."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if is_layout(attention_mask):
            attention_mask = dense_mask(attention_mask, query.shape[1], query.shape[0])
        return DotProductAttention.forward(self, query, key, value, attention_mask, attn_mask_type,
                                           attention_bias, packed_seq_params)
