"""Log-probabilities from vocabulary-parallel logits: each TP rank holds [N, V/tp]; the full [N, V] is never
gathered. Max and sum-exp are all-reduced over the TP group (two scalars per row), the target's logit comes
from the rank that owns it. Rows past the real vocabulary (Megatron's padding) are excluded.

    logp(y) = z_y - m - log sum_v exp(z_v - m),    m = max_v z_v
    d logp(y) / d z_v = 1[v = y] - softmax(z)_v
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_layout():
    """(megatron's TP group, this rank in it, its size); (None, 0, 1) before megatron is initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 0, 1
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()


def _all_reduce(t: torch.Tensor, group, world: int, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _real_columns(logits: torch.Tensor, vocab: int, rank: int) -> tuple[torch.Tensor, int]:
    """The shard's real-vocabulary columns as a view (no copy: the padding is sliced off, not masked), in
    at least fp32, and the shard's first id. A shard of padding only has zero real columns."""
    n = logits.shape[-1]
    start = rank * n
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return z[..., :max(min(n, vocab - start), 0)], start


class _TargetLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab):
        group, rank, world = tp_layout()
        z, start = _real_columns(logits, vocab, rank)
        m = _all_reduce(_row_max(z), group, world, dist.ReduceOp.MAX)
        sumexp = _all_reduce((z - m[..., None]).exp().sum(-1), group, world)
        local = targets - start
        mine = (local >= 0) & (local < z.shape[-1])
        picked = z.gather(-1, local.clamp(0, max(z.shape[-1] - 1, 0))[..., None])[..., 0] * mine \
            if z.shape[-1] else torch.zeros_like(m)
        picked = _all_reduce(picked, group, world)
        ctx.save_for_backward(z, m, sumexp, local, mine)
        ctx.in_dtype, ctx.width = logits.dtype, logits.shape[-1]
        return picked - m - sumexp.log()

    @staticmethod
    def backward(ctx, grad):
        z, m, sumexp, local, mine = ctx.saved_tensors
        g = torch.zeros(*z.shape[:-1], ctx.width, dtype=z.dtype, device=z.device)
        real = g[..., :z.shape[-1]]
        torch.sub(z, m[..., None], out=real)
        real.exp_().div_(sumexp[..., None]).mul_(-grad[..., None])
        if z.shape[-1]:
            real.scatter_add_(-1, local.clamp(0, z.shape[-1] - 1)[..., None], (grad * mine)[..., None])
        return g.to(ctx.in_dtype), None, None


def _row_max(z: torch.Tensor) -> torch.Tensor:
    if z.shape[-1] == 0:  # a shard of padding only: neutral for the MAX all-reduce
        return torch.full(z.shape[:-1], torch.finfo(z.dtype).min, dtype=z.dtype, device=z.device)
    return z.max(-1).values


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """log p(targets) [...] from this rank's logits shard [..., V/tp]; differentiable; collective over TP."""
    return _TargetLogprob.apply(logits, targets, vocab)


@torch.no_grad()
def entropy(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Entropy of the full-vocabulary distribution [...] from the shard [..., V/tp]."""
    group, rank, world = tp_layout()
    z, _ = _real_columns(logits, vocab, rank)
    m = _all_reduce(_row_max(z), group, world, dist.ReduceOp.MAX)
    e = (z - m[..., None]).exp()
    sums = _all_reduce(torch.stack([e.sum(-1), (e * (z - m[..., None])).sum(-1)]), group, world)
    return sums[0].log() - sums[1] / sums[0]
