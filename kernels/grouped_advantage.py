"""Grouped advantages in one pass: per-sample grpo, rloo and dr_grpo advantages from rewards and group ids
(groups of any size, in any order), and their broadcast to per-token advantages under the response mask.

    grpo     A_i = (r_i - mean_g) / (std_g + eps)     std unbiased; a group of one gets 0
    rloo     A_i = n/(n-1) (r_i - mean_g)             a group of one gets 0
    dr_grpo  A_i = r_i - mean_g

Triton: samples are sorted by group on the host (a stable argsort), then one program per group loads its
rewards once and writes all three estimators; a second kernel broadcasts one of them over tokens. The
PyTorch reference (rlv_megatron.algos.advantages) defines the values and dispatches to this kernel for CUDA
tensors; nothing here imports rlv_megatron.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ESTIMATORS = ("grpo", "rloo", "dr_grpo")


@triton.jit
def _group_kernel(rewards_ptr, order_ptr, starts_ptr, counts_ptr, out_ptr, n_total, eps,
                  BLOCK: tl.constexpr):
    g = tl.program_id(0)
    start = tl.load(starts_ptr + g)
    n = tl.load(counts_ptr + g)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    idx = tl.load(order_ptr + start + offs, mask=valid, other=0)
    r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)  # upcast right after the load
    nf = n.to(tl.float32)
    mean = tl.sum(r, axis=0) / nf
    d = tl.where(valid, r - mean, 0.0)
    var = tl.sum(d * d, axis=0) / tl.maximum(nf - 1.0, 1.0)
    several = n > 1
    grpo = tl.where(several, d / (tl.sqrt(var) + eps), 0.0)
    rloo = tl.where(several, d * nf / tl.maximum(nf - 1.0, 1.0), 0.0)
    tl.store(out_ptr + idx, grpo, mask=valid)
    tl.store(out_ptr + n_total + idx, rloo, mask=valid)
    tl.store(out_ptr + 2 * n_total + idx, d, mask=valid)


@triton.jit
def _broadcast_kernel(adv_ptr, mask_ptr, out_ptr, T, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    t0 = tl.program_id(1) * BLOCK_T
    offs = t0 + tl.arange(0, BLOCK_T)
    inside = offs < T
    a = tl.load(adv_ptr + b)
    m = tl.load(mask_ptr + b * T + offs, mask=inside, other=0)
    tl.store(out_ptr + b * T + offs, tl.where(m != 0, a, 0.0), mask=inside)


def _check(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be "
                         "1-D of the same length")
    if not rewards.is_floating_point() or group_ids.is_floating_point():
        raise TypeError(f"rewards must be floating point and group_ids integer, got {rewards.dtype} and "
                        f"{group_ids.dtype}")
    if group_ids.numel() and int(group_ids.min()) < 0:
        raise ValueError("group_ids must be >= 0")


def all_advantages_triton(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[3, N] float32: grpo, rloo, dr_grpo advantages (rows in ESTIMATORS order), one kernel launch."""
    _check(rewards, group_ids)
    N = rewards.numel()
    out = torch.zeros(3, N, dtype=torch.float32, device=rewards.device)
    if N == 0:
        return out
    order = torch.argsort(group_ids, stable=True).to(torch.int32)
    counts = torch.bincount(group_ids, minlength=int(group_ids.max()) + 1)
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    block = triton.next_power_of_2(max(int(counts.max()), 1))
    _group_kernel[(counts.numel(),)](rewards.contiguous(), order, starts, counts.to(torch.int32), out, N, eps,
                                     BLOCK=block)
    return out


def token_advantages_triton(adv: torch.Tensor, mask: torch.Tensor, block_t: int = 128) -> torch.Tensor:
    """[B, T]: adv[b] where mask[b, t], else 0."""
    if adv.dim() != 1 or mask.dim() != 2 or mask.shape[0] != adv.shape[0]:
        raise ValueError(f"adv {tuple(adv.shape)} and mask {tuple(mask.shape)}: need [B] and [B, T]")
    B, T = mask.shape
    out = torch.empty(B, T, dtype=torch.float32, device=adv.device)
    if B and T:
        _broadcast_kernel[(B, triton.cdiv(T, block_t))](adv.float().contiguous(), mask.to(torch.int8).contiguous(),
                                                         out, T, BLOCK_T=block_t)
    return out


def token_advantages_reference(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return adv.float()[:, None] * mask.to(torch.float32)
