"""kernels/verifier_loss: the chunked PyTorch path against the full-logits definition (values, entropy and
gradients), gradcheck, dtypes, bad inputs, TP=2 vocabulary shards against one rank, and the trainer's fused
head against its logits head on tied and untied models. The Triton path: tests/interpreted/."""

import pytest
import torch

from kernels.verifier_loss import fused_logprobs, naive_logprobs
from tests.distributed import run_distributed


def problem(n=37, h=16, v=50, pad=6, k=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v + pad, h, generator=g, dtype=dtype).requires_grad_()  # rows past v: vocab padding
    targets = torch.randint(0, v, (n, k) if k else (n,), generator=g)
    temps = torch.rand(n, generator=g, dtype=dtype) + 0.5
    upstream = torch.randn(targets.shape, generator=g, dtype=torch.float64)
    return hidden, weight, targets, v, temps, upstream


def value_and_grads(fn, hidden, weight, targets, v, temps, upstream):
    lp, ent = fn(hidden, weight, targets, v, temps)
    gh, gw = torch.autograd.grad((lp.double() * upstream).sum(), [hidden, weight])
    return lp.detach(), ent, gh, gw


def chunked(chunk, **kw):
    return lambda h, w, t, v, temps: fused_logprobs(h, w, t, v, temps, chunk=chunk, use_triton=False, **kw)


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("chunk", [1, 8, 1000])  # 37 rows: chunks of one, a ragged last chunk, one chunk
def test_chunked_reference_equals_full_logits(k, chunk):
    p = problem(k=k)
    got = value_and_grads(chunked(chunk), *p)
    want = value_and_grads(naive_logprobs, *p)
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12), name
    assert got[3][p[3]:].abs().max() == 0  # the padding rows get no gradient
    assert torch.isfinite(got[0]).all() and (got[0] < 0).all()


def test_gradcheck_of_the_chunked_reference():
    hidden, weight, targets, v, temps, _ = problem(n=5, h=4, v=7, pad=1)
    assert torch.autograd.gradcheck(lambda h, w: fused_logprobs(h, w, targets, v, temps, chunk=2,
                                                                use_triton=False)[0], (hidden, weight))


def test_fp32_within_1e5_and_bf16_returns_fp32_logprobs():
    h, w, t, v, temps, up = problem(dtype=torch.float32)
    got = value_and_grads(chunked(8), h, w, t, v, temps, up)
    want = value_and_grads(naive_logprobs, h, w, t, v, temps, up)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    lp, ent = fused_logprobs(hb, wb, t, v, temps.float(), chunk=8)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert (lp - want[0]).abs().max() < 0.3  # bf16 logits: a few units in the last place of ~|z|
    gh, gw = torch.autograd.grad(lp.sum(), [hb, wb])
    assert gh.dtype == gw.dtype == torch.bfloat16


def test_no_rows_and_scalar_temperature():
    h, w, t, v, _, _ = problem(n=0)
    lp, ent = fused_logprobs(h, w, t, v, 0.7, chunk=4)
    assert lp.shape == (0, 3) and ent.shape == (0,)
    h, w, t, v, _, up = problem(n=3, k=0)
    a = value_and_grads(chunked(2), h, w, t, v, torch.full((3,), 0.7, dtype=torch.float64), up)
    lp, _ = fused_logprobs(h, w, t, v, 0.7, chunk=2)
    assert torch.allclose(lp, a[0])


@pytest.mark.parametrize("bad, message", [
    (dict(weight=torch.zeros(5, 3)), r"hidden \[N, H\] \(4, 2\) and weight \[V, H\] \(5, 3\)"),
    (dict(weight=torch.zeros(5, 2, dtype=torch.float64)), "must share one floating dtype"),
    (dict(targets=torch.zeros(4)), "must be integer"),
    (dict(targets=torch.zeros(3, dtype=torch.long)), "N = 4 rows"),
    (dict(temperature=torch.ones(3)), r"must be a number or \[N = 4\]"),
    (dict(chunk=0), "chunk must be at least 1"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(hidden=torch.zeros(4, 2), weight=torch.zeros(5, 2), targets=torch.zeros(4, dtype=torch.long),
                vocab=5, temperature=1.0, chunk=2)
    with pytest.raises((ValueError, TypeError), match=message):
        fused_logprobs(**{**args, **bad})


def tp_worker(use_triton, world):
    """Rank r holds vocabulary rows [r V/tp, (r+1) V/tp) of the padded output weight; returns the rank's
    log-probs, entropy, hidden-state gradient summed over ranks (as megatron's region does) and weight-shard
    gradient."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    h, w, t, v, temps, up = problem(n=29, v=49, pad=3, dtype=torch.float32)  # 52 rows: rank 1 has padding
    shard = w.detach()[rank * 52 // world:(rank + 1) * 52 // world].clone().requires_grad_()
    lp, ent, gh, gw = value_and_grads(
        lambda h_, w_, t_, v_, temps_: fused_logprobs(h_, w_, t_, v_, temps_, chunk=8, use_triton=use_triton,
                                                      tp_group=dist.group.WORLD), h, shard, t, v, temps, up)
    dist.all_reduce(gh)
    return lp, ent, gh, gw


def assert_tp_equals_one_rank(use_triton, world=2):
    ranks = run_distributed(tp_worker, world, use_triton, world)
    h, w, t, v, temps, up = problem(n=29, v=49, pad=3, dtype=torch.float32)
    want = value_and_grads(naive_logprobs, h, w, t, v, temps, up)
    for lp, ent, gh, _ in ranks:
        for a, b in zip((lp, ent, gh), want[:3]):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.allclose(torch.cat([r[3] for r in ranks]), want[3], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tp2_vocabulary_shards_equal_one_rank():
    assert_tp_equals_one_rank(use_triton=False)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_scores_as_the_logits_head(tmp_path, tied):
    ranks = run_distributed(head_worker, 1, str(tmp_path), tied)
    (fused_lp, fused_yes, fused_stats), (logits_lp, logits_yes, logits_stats) = ranks[0]
    assert torch.allclose(fused_lp, logits_lp, atol=1e-5) and torch.allclose(fused_yes, logits_yes, atol=1e-6)
    for k in logits_stats:
        assert fused_stats[k] == pytest.approx(logits_stats[k], rel=1e-5, abs=1e-6), k


def head_worker(out_dir, tied):
    """score() and one train step under train.logprob_impl=fused and =logits on the same model."""
    from rlv_megatron.config import Config
    from rlv_megatron.models.tiny import make_hf_model
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import rl_objective, score
    from tests.test_parallel_step import NO, YES, synthetic_batch

    path = make_hf_model("qwen2", f"{out_dir}/m", seed=5, tie_word_embeddings=tied)
    out = []
    for impl in ("fused", "logits"):
        from rlv_megatron import dist

        cfg = Config()
        cfg.model.path, cfg.train.logprob_impl = str(path), impl
        cfg.train.logprob_chunk_mb = 0.001  # chunks of a few rows
        cfg.train.micro_batch_tokens, cfg.algo.temperature = 64, 0.7
        policy = Policy(cfg)
        batch = synthetic_batch()
        lp, p_yes = score(policy.chunks, batch, policy.vocab, 0.7, YES, NO, cfg.train, policy.groups)
        stats = policy.train_step(batch, rl_objective(batch, lp + 0.1, cfg.algo, cfg.verifier, policy.vocab,
                                                      YES, NO))
        out.append((lp, p_yes, stats))
        dist.destroy()
    return out
