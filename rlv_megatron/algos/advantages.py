"""Advantage estimators over groups of samples of one prompt (groups may differ in size).

    grpo      A_i = (r_i - mean_g r) / (std_g r + eps)     std unbiased (n-1); a group of one gets 0
    rloo      A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_g r)   (leave-one-out PPO)
    dr_grpo   A_i = r_i - mean_g r                          (no std, no length normalisation)
"""

from __future__ import annotations

import torch

from rlv_megatron.registry import Registry

ADVANTAGES = Registry("algo.advantage")
register_advantage = ADVANTAGES.register


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample group size, mean and unbiased variance (one pass of scatter-adds)."""
    groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    r = rewards.double()
    n = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, group_ids, torch.ones_like(r))
    s = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, group_ids, r)
    mean = s / n.clamp(min=1)
    sq = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, group_ids, (r - mean[group_ids]) ** 2)
    var = sq / (n - 1).clamp(min=1)
    return n[group_ids], mean[group_ids], var[group_ids]


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    n, mean, var = group_stats(rewards, group_ids)
    adv = (rewards.double() - mean) / (var.sqrt() + eps)
    return torch.where(n > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    n, mean, _ = group_stats(rewards, group_ids)
    adv = n / (n - 1).clamp(min=1) * (rewards.double() - mean)
    return torch.where(n > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


@register_advantage("dr_grpo")
def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    _, mean, _ = group_stats(rewards, group_ids)
    return (rewards.double() - mean).to(rewards.dtype)


def compute_advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                       use_triton: bool | None = None) -> torch.Tensor:
    """One estimator's per-sample advantages: the registered estimator (the lookup names an unknown one), or
    kernels/grouped_advantage.py's Triton kernel, which computes these same three, for CUDA tensors (or
    use_triton=True)."""
    estimator = ADVANTAGES.lookup(name)
    if use_triton if use_triton is not None else rewards.is_cuda:
        from kernels.grouped_advantage import ESTIMATORS, all_advantages_triton

        if name in ESTIMATORS:
            return all_advantages_triton(rewards, group_ids, eps)[ESTIMATORS.index(name)].to(rewards.dtype)
    return estimator(rewards, group_ids, eps)


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mask of samples whose group has unequal rewards (all-equal groups carry no policy gradient)."""
    _, _, var = group_stats(rewards, group_ids)
    return var > 0
