"""Fused linear log-prob: per-position log-probabilities of target tokens (and the entropy) straight from the
final hidden states [N, H] and the output embedding [V_shard, H], in row chunks, so the [N, V] logits are
never materialised. The verifier loss uses it at the verification answer positions (targets = label, "Yes",
"No"; see rlv_megatron/train/step.py), the policy loss at every other position.

    z = (h W^T) / T_n                               one chunk of rows at a time, this rank's vocabulary shard
    logp(y) = z_y - m - log S,  S = sum_v exp(z_v - m),  m = max_v z_v        (m, S combined across TP)
    entropy = log S - A / S,    A = sum_v exp(z_v - m) (z_v - m)
    backward: dz_v = (sum_k g_k 1[v = y_k] - (sum_k g_k) softmax(z)_v) / T_n
              dh = dz W (summed over TP by the caller's region), dW = dz^T h

Forward keeps only (m, log S) per row; backward recomputes each chunk's logits (one extra matmul, the usual
price of not storing [N, V]). Across tensor parallelism each rank owns a vocabulary shard: per-row (m, S, A)
are combined with one MAX and one SUM all-reduce for the whole input, and the target's logit comes from the
rank that owns it. Rows of Megatron's vocabulary padding are sliced off (a view). The entropy is returned
without gradient (a statistic). Matmuls run in the input dtype; the logits chunk, its statistics and dW
accumulate in fp32, and the log-probs come out in fp32 whatever the input dtype.

The per-chunk reductions run as Triton kernels for CUDA tensors (or when asked, e.g. under
TRITON_INTERPRET=1) and as the PyTorch reference otherwise; `naive_logprobs` is the full-logits definition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

_NEG_VALUE = -1.0e30  # a finite "minus infinity": keeps exp(m_old - m_new) and (m_old - m_new) * 0 free of NaN
_NEG: tl.constexpr = tl.constexpr(_NEG_VALUE)


@triton.jit
def _row_stats_kernel(z_ptr, stride, V, m_ptr, s_ptr, a_ptr, BLOCK_V: tl.constexpr):
    """Online max, sum-exp and entropy accumulator of one row of the logits chunk."""
    row = tl.program_id(0)
    base = z_ptr + row * stride
    m = tl.full((), _NEG, tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = cols < V
        z = tl.load(base + cols, mask=inside, other=_NEG).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = tl.where(inside, z - m_new, 0.0)
        e = tl.where(inside, tl.exp(d), 0.0)
        scale = tl.exp(m - m_new)
        a = scale * (a + (m - m_new) * s) + tl.sum(e * d, axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(a_ptr + row, a)


@triton.jit
def _grad_kernel(z_ptr, stride, V, lse_ptr, g_ptr, t_ptr, inv_t_ptr, K: tl.constexpr, BLOCK_V: tl.constexpr):
    """In place: logits -> d loss / d (h W^T) for one (row, vocabulary block)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < V
    z = tl.load(z_ptr + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    inv_t = tl.load(inv_t_ptr + row)
    g_sum = tl.zeros((), tl.float32)
    hit = tl.zeros((BLOCK_V,), tl.float32)
    for k in tl.static_range(K):
        g = tl.load(g_ptr + row * K + k)
        t = tl.load(t_ptr + row * K + k)  # local column, or -1 when another rank owns the target
        g_sum += g
        hit += tl.where(cols == t, g, 0.0)
    dz = (hit - g_sum * tl.exp(z - lse)) * inv_t
    tl.store(z_ptr + row * stride + cols, dz, mask=inside)


def _stats_triton(z: torch.Tensor, block_v: int = 1024):
    n, v = z.shape
    m, s, a = (torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(3))
    _row_stats_kernel[(n,)](z, z.stride(0), v, m, s, a, BLOCK_V=block_v)
    return m, s, a


def _stats_reference(z: torch.Tensor):
    """Overwrites z (with z - m): two chunk-sized buffers at most."""
    m = z.max(-1).values
    d = z.sub_(m[:, None])
    e = d.exp()
    s = e.sum(-1)
    return m, s, e.mul_(d).sum(-1)


def _grad_triton(z, lse, g, local, inv_t, block_v: int = 1024):
    n, v = z.shape
    _grad_kernel[(n, triton.cdiv(v, block_v))](z, z.stride(0), v, lse, g.contiguous(), local.contiguous(),
                                                inv_t, K=g.shape[1], BLOCK_V=block_v)
    return z


def _grad_reference(z, lse, g, local, inv_t):
    z.sub_(lse[:, None]).exp_().mul_(-g.sum(-1, keepdim=True))
    mine = local >= 0
    z.scatter_add_(1, local.clamp(min=0), g * mine)
    return z.mul_(inv_t[:, None])


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _tp_group(group):
    if group is None:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def _combine(m, s, a, picked, group, world):
    """Per-row shard statistics -> full-vocabulary (m, S, A) and target logits: one MAX, one SUM all-reduce."""
    if world == 1:
        return m, s, a, picked
    m_all = m.clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    scale = (m - m_all).exp()
    sums = torch.cat([s * scale, scale * (a + (m - m_all) * s), picked.reshape(-1)])
    dist.all_reduce(sums, group=group)
    n = len(m)
    return m_all, sums[:n], sums[n:2 * n], sums[2 * n:].view_as(picked)


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, vocab, chunk, use_triton, group):
        group, rank, world = _tp_group(group)
        shard = weight.shape[0]
        start = rank * shard
        w = weight[:max(min(shard, vocab - start), 0)]  # real vocabulary rows of this shard (a view)
        local = targets - start
        local = torch.where((local >= 0) & (local < w.shape[0]), local, -1)
        n, acc = hidden.shape[0], _acc_dtype(hidden)
        m = torch.full((n,), _NEG_VALUE, dtype=acc, device=hidden.device)
        s, a, picked = torch.zeros_like(m), torch.zeros_like(m), torch.zeros(targets.shape, dtype=acc, device=m.device)
        if w.shape[0]:
            stats = _stats_triton if use_triton else _stats_reference
            for r0 in range(0, n, chunk):
                r = slice(r0, min(r0 + chunk, n))
                z = (hidden[r] @ w.T).to(acc).mul_(inv_t[r, None])
                picked[r] = z.gather(1, local[r].clamp(min=0)) * (local[r] >= 0)
                m[r], s[r], a[r] = stats(z)
                del z
        m, s, a, picked = _combine(m, s, a, picked, group, world)
        lse = m + s.log()
        ctx.save_for_backward(hidden, weight, local, inv_t, lse)
        ctx.vocab_rows, ctx.chunk, ctx.use_triton = w.shape[0], chunk, use_triton
        ent = s.log() - a / s
        ctx.mark_non_differentiable(ent)
        return picked - lse[:, None], ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, local, inv_t, lse = ctx.saved_tensors
        w = weight[:ctx.vocab_rows]
        grad_h = torch.zeros_like(hidden)
        acc = _acc_dtype(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        if w.shape[0] and grad_logp is not None:
            g = grad_logp.to(acc)
            to_grad = _grad_triton if ctx.use_triton else _grad_reference
            for r0 in range(0, hidden.shape[0], ctx.chunk):
                r = slice(r0, min(r0 + ctx.chunk, hidden.shape[0]))
                z = (hidden[r] @ w.T).to(acc).mul_(inv_t[r, None])
                dz = to_grad(z, lse[r], g[r], local[r], inv_t[r]).to(hidden.dtype)
                grad_h[r] = dz @ w
                grad_w[:ctx.vocab_rows].addmm_(dz.T.to(acc), hidden[r].to(acc))
                del z, dz
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None


def chunk_rows(vocab_rows: int, budget_mb: float) -> int:
    """Rows per chunk so that one fp32 logits chunk [rows, vocab_rows] takes about `budget_mb` MiB."""
    return max(1, int(budget_mb * 2**20) // (4 * max(vocab_rows, 1)))


def _check(hidden, weight, targets, inv_t, chunk):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] {tuple(hidden.shape)} and weight [V, H] {tuple(weight.shape)} "
                         "must be 2-D with the same H")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype")
    if targets.dim() not in (1, 2) or targets.shape[0] != hidden.shape[0] or targets.is_floating_point():
        raise ValueError(f"targets {tuple(targets.shape)} {targets.dtype} must be integer [N] or [N, K] with "
                         f"N = {hidden.shape[0]} rows of hidden")
    if inv_t.shape != (hidden.shape[0],):
        raise ValueError(f"inverse temperature {tuple(inv_t.shape)} must be a number or [N = {hidden.shape[0]}]")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 row, got {chunk}")


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                   temperature: float | torch.Tensor = 1.0, chunk: int = 1024, use_triton: bool | None = None,
                   tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets) [N] or [N, K], entropy [N]) of softmax(hidden @ weight^T / temperature) over the full
    vocabulary, computed `chunk` rows at a time. `weight` is this rank's vocabulary shard (rows
    [rank * V_shard, ...), padding past `vocab` ignored); collective over `tp_group` (None: one rank).
    `temperature`: a number or one per row. Differentiable in hidden and weight (the caller sums dh across TP,
    as megatron's region functions do). Triton by default for CUDA tensors."""
    if torch.is_tensor(temperature) and temperature.dim() == 1:
        inv_t = (1.0 / temperature.to(_acc_dtype(hidden))).contiguous()
    else:
        inv_t = torch.full(hidden.shape[:1], 1.0 / float(temperature), dtype=_acc_dtype(hidden),
                           device=hidden.device)
    _check(hidden, weight, targets, inv_t, chunk)
    use_triton = hidden.is_cuda if use_triton is None else use_triton
    one = targets.dim() == 1
    lp, ent = _FusedLinearLogprob.apply(hidden, weight, targets.long()[:, None] if one else targets.long(), inv_t,
                                        vocab, chunk, use_triton, tp_group)
    return (lp[:, 0] if one else lp), ent


def naive_logprobs(hidden, weight, targets, vocab, temperature=1.0):
    """The definition with full logits [N, V] (one rank): reference for tests and the benchmark's baseline."""
    z = (hidden @ weight[:vocab].T).to(torch.promote_types(hidden.dtype, torch.float32))
    z = z / (temperature[:, None] if torch.is_tensor(temperature) and temperature.dim() else temperature)
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(1, targets.long()[:, None] if targets.dim() == 1 else targets.long())
    ent = -(logp.exp() * logp).sum(-1)
    return (lp[:, 0] if targets.dim() == 1 else lp), ent.detach()
