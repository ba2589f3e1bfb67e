"""The local spec's core attention through torch's scaled_dot_product_attention (CPU and non-TE GPUs).

megatron's DotProductAttention materialises the [b, heads, s, s] scores and probabilities, keeps both for the
backward and forks the RNG tracker in every layer; SDPA's fused kernels keep neither (a per-row logsumexp
instead), so attention memory is linear in the row, not quadratic. Same maths: a causal mask without an
attention mask (one sequence per row), megatron's boolean mask (True = masked; packed rows) otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed_seq_params / attention_bias (use the TE spec)")
        if self.config.attention_dropout and self.training:
            return super().forward(query, key, value, attention_mask, attn_mask_type)  # the RNG-tracked dropout
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # GQA: repeat K/V heads (as the parent does)
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, h] -> [b, n, s, h]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale)
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, n * h]
