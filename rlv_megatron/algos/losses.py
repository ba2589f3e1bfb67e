"""Per-token losses, written as named components (all tensors [B, T] over target positions).

    ratio_t      = exp(logp_t - old_logp_t)
    policy_t     = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A)          (PPO-clip)
    tis_t        = min(exp(old_logp_t - rollout_logp_t), C)   detached; truncated importance weight for
                   the mismatch between the trainer and the sampling engine (off when C is None)
    kl_t         = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                          (k3, coefficient beta)
    verifier     = CE(answer token | prompt, solution, question): full vocabulary, or two-way Yes/No
Aggregation over the mask: token_mean (all tokens of the batch equal), seq_mean (each sequence equal),
constant (Dr.GRPO: sum / (num_sequences * a fixed length), no length normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlv_megatron.registry import Registry

AGGREGATIONS = Registry("algo.loss_agg")
register_aggregation = AGGREGATIONS.register


@register_aggregation("token_mean")
def token_mean(values: torch.Tensor, mask: torch.Tensor, constant: int | None = None) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


@register_aggregation("seq_mean")
def seq_mean(values: torch.Tensor, mask: torch.Tensor, constant: int | None = None) -> torch.Tensor:
    lengths = mask.sum(-1)
    per_seq = (values * mask).sum(-1) / lengths.clamp(min=1)
    has = (lengths > 0).to(values.dtype)
    return (per_seq * has).sum() / has.sum().clamp(min=1)


@register_aggregation("constant")
def constant_norm(values: torch.Tensor, mask: torch.Tensor, constant: int | None = None) -> torch.Tensor:
    if constant is None:
        raise ValueError("algo.loss_agg=constant needs a constant length (the generation max_tokens)")
    return (values * mask).sum() / (mask.shape[0] * constant)


def aggregate(name: str, values, mask, constant=None) -> torch.Tensor:
    return AGGREGATIONS.lookup(name)(values, mask.to(values.dtype), constant)


@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    kl: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, agg="token_mean",
                agg_constant=None, rollout_logp=None, tis_cap=None, ref_logp=None, kl_beta=0.0) -> PolicyLossOut:
    """PPO-clip per token; `advantages` is [B] (broadcast over tokens) or [B, T]."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if tis_cap is not None and rollout_logp is not None:
        per_token = per_token * torch.exp(old_logp - rollout_logp).clamp(max=tis_cap).detach()
    kl = torch.zeros((), dtype=logp.dtype)
    if kl_beta and ref_logp is not None:
        d = ref_logp - logp
        kl_t = torch.exp(d) - d - 1
        per_token = per_token + kl_beta * kl_t
        kl = token_mean(kl_t.detach(), mask.to(logp.dtype))
    m = mask.to(logp.dtype)
    with torch.no_grad():
        clip_frac = token_mean((clipped < unclipped).to(logp.dtype), m)
        ratio_mean = token_mean(ratio, m)
    return PolicyLossOut(aggregate(agg, per_token, mask, agg_constant), clip_frac, kl, ratio_mean)


def verifier_loss(answer_logits: torch.Tensor, labels: torch.Tensor, yes_id: int, no_id: int, mode: str = "full",
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """CE at the verification answer position. answer_logits [N, V]; labels [N] in {yes_id, no_id};
    weight [N] selects which examples count (class balancing). mode: full | yes_no."""
    if mode == "full":
        per = torch.nn.functional.cross_entropy(answer_logits.float(), labels, reduction="none")
    elif mode == "yes_no":
        two = answer_logits[:, [yes_id, no_id]].float()
        per = torch.nn.functional.cross_entropy(two, (labels == no_id).long(), reduction="none")
    else:
        raise ValueError(f"verifier.loss={mode!r}: must be full or yes_no")
    w = torch.ones_like(per) if weight is None else weight.to(per.dtype)
    return (per * w).sum() / w.sum().clamp(min=1)
