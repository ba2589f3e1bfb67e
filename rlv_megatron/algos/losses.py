"""Per-token losses, written as named components (all tensors [B, T] over target positions).

    ratio_t      = exp(logp_t - anchor_t)       anchor: old_logp_t, the proximal policy (the trainer's weights at
                   the step's start), or the engine's rollout_logp_t under algo.off_policy=behaviour_ratio
    policy_t     = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A) x is_t             (PPO-clip)
    w_t          = exp(old_logp_t - rollout_logp_t)     behaviour importance weight: the trainer against the
                   weights that sampled the token (stale under overlap or partial rollouts; off-by-precision
                   otherwise)
    is_t         by algo.off_policy, detached, with C = algo.tis_cap (None: no correction, is_t = 1):
                   truncated_is     min(w_t, C)               (TIS; the decoupled objective of off-policy PPO,
                                                               Hilton et al. 2021, with a truncated weight)
                   masked_is        w_t if w_t <= C else 0    (AReaL's decoupled PPO: tokens past the cap dropped)
                   behaviour_ratio  1, with anchor = rollout_logp: PPO clipped against the sampling policy itself
                                    (the coupled objective; no proximal policy, C unused)
    kl_t         = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                          (k3, coefficient beta)
    verifier     = CE(answer token | prompt, solution, question): full vocabulary, or two-way Yes/No
Aggregation over the mask: token_mean (all tokens of the batch equal), seq_mean (each sequence equal),
constant (Dr.GRPO: sum / (num_sequences * a fixed length), no length normalisation). Each is a per-token
weight computed once for the whole mini-batch, so micro-batches and data-parallel ranks just sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlv_megatron.registry import Registry

AGGREGATIONS = Registry("algo.loss_agg")
register_aggregation = AGGREGATIONS.register
OFF_POLICY = Registry("algo.off_policy")
register_off_policy = OFF_POLICY.register


@register_off_policy("truncated_is")
def truncated_is(old_logp, rollout_logp, cap):
    return old_logp, torch.exp(old_logp - rollout_logp).clamp(max=cap)


@register_off_policy("masked_is")
def masked_is(old_logp, rollout_logp, cap):
    w = torch.exp(old_logp - rollout_logp)
    return old_logp, torch.where(w <= cap, w, torch.zeros_like(w))


@register_off_policy("behaviour_ratio")
def behaviour_ratio(old_logp, rollout_logp, cap):
    return rollout_logp, None


def off_policy_terms(old_logp, rollout_logp, tis_cap, off_policy: str):
    """(the ratio's anchor log-probs, the detached per-token importance weight or None) for algo.off_policy."""
    if rollout_logp is None or (tis_cap is None and off_policy != "behaviour_ratio"):
        return old_logp, None
    anchor, weight = OFF_POLICY.lookup(off_policy)(old_logp, rollout_logp, tis_cap)
    return anchor, None if weight is None else weight.detach()


@dataclass
class Totals:
    """Counts over the whole mini-batch (all micro-batches and data-parallel ranks) that normalise a loss, so
    that summing weighted per-token values over the pieces gives exactly the mini-batch's loss."""
    tokens: float  # masked tokens
    sequences: float  # all sequences
    sequences_with_tokens: float

    @staticmethod
    def of(mask: torch.Tensor, dp_group=None) -> "Totals":
        t = torch.tensor([mask.sum(), mask.shape[0], (mask.sum(-1) > 0).sum()], dtype=torch.float64)  # host
        if dp_group is not None and torch.distributed.get_world_size(dp_group) > 1:
            from rlv_megatron.dist import all_reduce_host

            all_reduce_host(t, dp_group)  # host counts: under NCCL through the GPU
        return Totals(*t.tolist())


@register_aggregation("token_mean")
def token_mean_weights(mask: torch.Tensor, totals: Totals, constant: int | None = None) -> torch.Tensor:
    return mask / max(totals.tokens, 1.0)


@register_aggregation("seq_mean")
def seq_mean_weights(mask: torch.Tensor, totals: Totals, constant: int | None = None) -> torch.Tensor:
    return mask / mask.sum(-1, keepdim=True).clamp(min=1) / max(totals.sequences_with_tokens, 1.0)


@register_aggregation("constant")
def constant_weights(mask: torch.Tensor, totals: Totals, constant: int | None = None) -> torch.Tensor:
    if constant is None:
        raise ValueError("algo.loss_agg=constant needs a constant length (the generation max_tokens)")
    return mask / (max(totals.sequences, 1.0) * constant)


def aggregation_weights(name: str, mask: torch.Tensor, totals: Totals | None = None, constant=None) -> torch.Tensor:
    """Per-token weights w [B, T] with loss = sum(values * w); `totals` default to this mask's own."""
    m = mask.float()
    return AGGREGATIONS.lookup(name)(m, totals or Totals.of(m), constant)


def aggregate(name: str, values, mask, constant=None) -> torch.Tensor:
    return (values * aggregation_weights(name, mask, None, constant).to(values.dtype)).sum()


@dataclass
class PPOTerms:
    loss: torch.Tensor  # per token, to be weighted by the aggregation
    clipped: torch.Tensor  # per token, 1.0 where the clipped branch was taken
    ratio: torch.Tensor
    kl: torch.Tensor  # per token k3 (0 without a reference)
    is_weight: torch.Tensor  # per token importance weight is_t (1 without a correction)


def ppo_terms(logp, old_logp, advantages, clip_low=0.2, clip_high=0.2, rollout_logp=None, tis_cap=None,
              ref_logp=None, kl_beta=0.0, off_policy="truncated_is") -> PPOTerms:
    """PPO-clip per token; `advantages` is [B] (broadcast over tokens) or per token, like logp."""
    adv = advantages if advantages.dim() == logp.dim() else advantages[:, None].expand_as(logp)
    anchor, weight = off_policy_terms(old_logp, rollout_logp, tis_cap, off_policy)
    ratio = torch.exp(logp - anchor)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if weight is not None:
        per_token = per_token * weight
    kl_t = torch.zeros_like(logp)
    if kl_beta and ref_logp is not None:
        d = ref_logp - logp
        kl_t = torch.exp(d) - d - 1
        per_token = per_token + kl_beta * kl_t
    return PPOTerms(per_token, (clipped < unclipped).to(logp.dtype).detach(), ratio.detach(), kl_t.detach(),
                    torch.ones_like(logp) if weight is None else weight)


@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    kl: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, agg="token_mean",
                agg_constant=None, rollout_logp=None, tis_cap=None, ref_logp=None, kl_beta=0.0,
                off_policy="truncated_is") -> PolicyLossOut:
    """`ppo_terms` aggregated over one whole batch [B, T] (the trainer weights micro-batches instead)."""
    t = ppo_terms(logp, old_logp, advantages, clip_low, clip_high, rollout_logp, tis_cap, ref_logp, kl_beta,
                  off_policy)
    return PolicyLossOut(aggregate(agg, t.loss, mask, agg_constant), aggregate("token_mean", t.clipped, mask),
                         aggregate("token_mean", t.kl, mask), aggregate("token_mean", t.ratio, mask))


def verifier_ce(lp_label: torch.Tensor, lp_yes: torch.Tensor, lp_no: torch.Tensor, mode: str = "full"):
    """Per-example CE of the Yes/No label from full-vocabulary log-probs at the answer position:
    full: -log p(label); yes_no: the two-way CE, -log p(label) / (p(Yes) + p(No))."""
    if mode == "full":
        return -lp_label
    if mode == "yes_no":
        return torch.logaddexp(lp_yes, lp_no) - lp_label
    raise ValueError(f"verifier.loss={mode!r}: must be full or yes_no")


def verifier_loss(answer_logits: torch.Tensor, labels: torch.Tensor, yes_id: int, no_id: int, mode: str = "full",
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of `verifier_ce` from full logits [N, V] (reference form; labels in {yes_id, no_id})."""
    lp = torch.log_softmax(answer_logits.float(), -1)
    per = verifier_ce(lp.gather(-1, labels[:, None])[:, 0], lp[:, yes_id], lp[:, no_id], mode)
    w = torch.ones_like(per) if weight is None else weight.to(per.dtype)
    return (per * w).sum() / w.sum().clamp(min=1)
