"""The RL^V train step at TP=2 (with sequence parallel), PP=2, interleaved PP and DP=2 against one process;
packed against unpacked micro-batches; vocabulary-parallel log-probs against log_softmax."""

import pytest
import torch

from tests.distributed import run_distributed_in_turn

YES, NO = 5, 7


def synthetic_batch(n=12, seed=0, vocab=1000):
    """Sequences of different lengths with a response span and a Yes/No answer at the end."""
    from rlv_megatron.train.batch import SequenceBatch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(9, 30, (n,), generator=g)
    L = int(lens.max())
    tokens = torch.randint(10, vocab, (n, L), generator=g)
    targets = torch.randint(10, vocab, (n, L), generator=g)
    resp = torch.zeros(n, L, dtype=torch.bool)
    for i, m in enumerate(lens.tolist()):
        resp[i, 3:m - 4] = True
        tokens[i, m:] = 0
        targets[i, m:] = 0
    labels = torch.where(torch.rand(n, generator=g) > 0.5, YES, NO)
    targets[torch.arange(n), lens - 1] = labels
    return SequenceBatch(tokens, targets, resp, resp & (torch.arange(n) % 5 != 0)[:, None], lens - 1, labels,
                         (torch.arange(n) % 3 != 0).float(), torch.randn(n, generator=g),
                         -torch.rand(n, L, generator=g) * resp)


def grouped_batch(prompts=3, group=4, seed=1, vocab=1000):
    """`group` samples of each prompt (different lengths), each ending in a verification turn and answer."""
    from rlv_megatron.train.batch import SequenceBatch

    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (), generator=g))  # noqa: E731
    seqs, firsts = [], []
    for _ in range(prompts):
        prompt = torch.randint(10, vocab, (rand(5, 13),), generator=g).tolist()
        for _ in range(group):
            seqs.append(prompt + torch.randint(10, vocab, (rand(3, 11) + 4,), generator=g).tolist()
                        + [YES if rand(0, 2) else NO])
            firsts.append(len(prompt) - 1)
    n, L = len(seqs), max(map(len, seqs)) - 1
    tokens, targets = torch.zeros(n, L, dtype=torch.long), torch.zeros(n, L, dtype=torch.long)
    resp = torch.zeros(n, L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s) - 1], targets[i, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        resp[i, firsts[i]:len(s) - 5] = True  # the last 4 targets: verification suffix and answer
    lens = torch.tensor([len(s) - 1 for s in seqs])
    return SequenceBatch(tokens, targets, resp, resp & (torch.arange(n) % 5 != 0)[:, None], lens - 1,
                         targets[torch.arange(n), lens - 1], (torch.arange(n) % 3 != 0).float(),
                         torch.randn(n, generator=g), -torch.rand(n, L, generator=g) * resp)


def step_worker(model_dir, tp, pp, vpp, sp, dp, pack, agg, budget=64, recompute="none", share=None,
                attention="sdpa"):
    """`share` None: the synthetic batch; True / False: the grouped batch with or without shared prompts."""
    from megatron.core import parallel_state as ps

    from rlv_megatron.config import Config, ParallelConfig
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import rl_objective, score

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp, recompute=recompute)
    cfg.train.micro_batch_tokens, cfg.train.pack = budget, pack
    cfg.train.share_prompts, cfg.model.local_attention = bool(share), attention
    # Adam turns rounding noise in near-zero gradients into lr-sized updates (m / sqrt(v) ~ sign): with
    # eps=1e-6 such gradients move nothing, so step 2 compares the parallel layouts, not the rounding
    cfg.optim.lr, cfg.optim.eps = 1e-3, 1e-6
    cfg.algo.loss_agg, cfg.algo.max_tokens = agg, 24
    cfg.algo.clip_low = cfg.algo.clip_high = 0.1
    policy = Policy(cfg)
    full = synthetic_batch() if share is None else grouped_batch()
    rank, world = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rows = torch.arange(len(full)).chunk(world)[rank] if dp > 1 else torch.arange(len(full))
    batch = full.select(rows)
    # a shifted "old" policy so the ratios are not all 1 and clipping happens (a function of the full batch)
    shift = 0.2 * torch.sin(torch.arange(full.targets.numel()).view_as(full.targets).float())[rows]
    out = []
    for _ in range(2):
        old, p_yes = score(policy.chunks, batch, policy.vocab, 1.0, YES, NO, cfg.train, policy.groups)
        old = old + shift
        stats = policy.train_step(batch, rl_objective(batch, old, cfg.algo, cfg.verifier, policy.vocab, YES, NO,
                                                      dp_group=policy.groups.dp))
        out.append({**stats, "p_yes": p_yes.tolist()})
    return out


def _args(model_dir, world, tp=1, pp=1, vpp=None, sp=False, pack=True, agg="token_mean", budget=64,
          recompute="none", share=None, attention="sdpa"):
    dp = world // (tp * pp)  # budget 64: several micro-batches
    return (model_dir, tp, pp, vpp, sp, dp, pack, agg, budget, recompute, share, attention)


# Every step computed by this file, by name: (world size, step_worker's options). All of one world size run in
# one spawn of that many processes (tests/distributed.run_distributed_in_turn), computed once for the module.
RUNS = {
    "reference": (1, {}),
    "separate": (1, dict(share=False)),  # the grouped batch, every sample with its own copy of the prompt
    "unpacked": (1, dict(pack=False)),
    "dot_product": (1, dict(attention="dot_product")),
    "selective_recompute": (1, dict(recompute="selective")),
    "agg_seq_mean": (1, dict(agg="seq_mean")),
    "agg_constant": (1, dict(agg="constant")),
    "shared_packed": (1, dict(share=True)),
    "shared_unpacked": (1, dict(share=True, pack=False)),
    "shared_split_groups": (1, dict(share=True, budget=24)),
    "tp2_sp": (2, dict(tp=2, sp=True)),
    "pp2": (2, dict(pp=2)),
    "pp2_interleaved": (2, dict(pp=2, vpp=2)),
    "pp2_interleaved_whole_batch": (2, dict(pp=2, vpp=2, budget=4096)),
    "dp2": (2, {}),
    "tp2_full_recompute": (2, dict(tp=2, recompute="full")),
    "dp2_agg_seq_mean": (2, dict(agg="seq_mean")),
    "dp2_agg_constant": (2, dict(agg="constant")),
    "shared_tp2_sp": (2, dict(share=True, tp=2, sp=True)),
    "shared_pp2": (2, dict(share=True, pp=2)),
}


KEYS = ("loss/total", "loss/policy", "loss/verifier", "grad_norm", "policy/clip_fraction", "policy/entropy")


def _assert_same(ref, got, what):
    for s, (a, b) in enumerate(zip(ref, got)):
        for k in KEYS:
            assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-5), f"{what}: step {s} {k}: {b[k]} vs {a[k]}"
    assert ref[1]["loss/total"] != pytest.approx(ref[0]["loss/total"], abs=1e-4)  # the step changed the model
    assert ref[0]["policy/clip_fraction"] > 0


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from rlv_megatron.models.tiny import make_hf_model

    return make_hf_model("qwen2", tmp_path_factory.mktemp("qwen") / "m", seed=3)


@pytest.fixture(scope="module")
def runs(qwen) -> dict[str, list]:
    """Each of RUNS by name: the per-rank results, two steps each."""
    out = {}
    for world in (1, 2):
        names = [n for n, (w, _) in RUNS.items() if w == world]
        results = run_distributed_in_turn(step_worker, world, [_args(qwen, world, **RUNS[n][1]) for n in names])
        out.update(zip(names, results))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_sp", "pp2", "pp2_interleaved", "pp2_interleaved_whole_batch", "dp2"])
def test_parallel_step_equals_one_process(runs, layout):
    for r in runs[layout]:  # every rank reports the same, mini-batch-wide statistics
        _assert_same(runs["reference"][0], r, layout)


@pytest.mark.slow
def test_packed_equals_unpacked(runs):
    """The reference packs THD sequences (models.varlen); unpacked rows run under megatron's causal mask, and
    megatron's DotProductAttention gets the THD micro-batches as a dense block mask."""
    _assert_same(runs["reference"][0], runs["unpacked"][0], "unpacked")
    _assert_same(runs["reference"][0], runs["dot_product"][0], "packed, dot_product attention")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed", "unpacked", "split_groups", "tp2_sp", "pp2"])
def test_shared_prompts_equal_separate_sequences(runs, layout):
    """Each prompt computed once for its samples (train.share_prompts): the same losses, gradient norm and
    next step as every sample carrying its own copy of the prompt in one process (where TP=2 and PP=2 give
    what one process does: test_parallel_step_equals_one_process)."""
    for r in runs[f"shared_{layout}"]:
        _assert_same(runs["separate"][0], r, f"shared prompts {layout}")


@pytest.mark.slow
def test_activation_recompute_changes_nothing(runs):
    _assert_same(runs["reference"][0], runs["tp2_full_recompute"][0], "tp2 full recompute")
    _assert_same(runs["reference"][0], runs["selective_recompute"][0], "selective recompute")


@pytest.mark.slow
@pytest.mark.parametrize("agg", ["seq_mean", "constant"])
def test_aggregations_split_exactly_over_data_parallel(runs, agg):
    _assert_same(runs[f"agg_{agg}"][0], runs[f"dp2_agg_{agg}"][0], f"dp2 {agg}")


def test_vocab_parallel_logprobs_equal_log_softmax():
    from rlv_megatron.train.vocab_parallel import entropy, target_logprobs

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 12, (3, 5))
    vocab = 12  # columns 12..15 are Megatron's padding: excluded
    ref = torch.log_softmax(logits[..., :vocab], -1).gather(-1, targets[..., None])[..., 0]
    got = target_logprobs(logits, targets, vocab)
    assert torch.allclose(got, ref, atol=1e-12)
    w = torch.randn(3, 5, dtype=torch.float64)
    g_ref, = torch.autograd.grad((ref * w).sum(), logits)
    g_got, = torch.autograd.grad((got * w).sum(), logits)
    assert torch.allclose(g_got, g_ref, atol=1e-12)
    assert g_got[..., vocab:].abs().max() == 0
    p = torch.softmax(logits[..., :vocab], -1)
    assert torch.allclose(entropy(logits, vocab), -(p * p.log()).sum(-1), atol=1e-10)
    assert torch.autograd.gradcheck(lambda z: target_logprobs(z, targets, vocab), (logits,))


def test_row_plan():
    from rlv_megatron.train.packing import plan_rows

    assert plan_rows([5, 3, 4, 2], budget=8, pack=True) == [[[0, 1]], [[2, 3]]]  # one row of the budget each
    assert plan_rows([5, 3, 4, 2], budget=10, pack=True, min_count=3) == [[[0, 1, 3]], [[2]], []]  # first fit
    assert plan_rows([5, 3, 4, 2, 1], budget=15, pack=False) == [[[0], [1], [2]], [[3], [4]]]
    assert plan_rows([5, 3, 4, 2, 1], budget=10, pack=False) == [[[0], [1]], [[2], [3]], [[4]]]
    assert plan_rows([5, 3], budget=10, pack=False, min_count=3) == [[[0]], [[1]], []]  # one per stage
    with pytest.raises(ValueError, match="micro_batch_tokens=4"):
        plan_rows([5], budget=4, pack=True)
    # own shapes (no pipeline): longest rows first, as many as fit at the first one's length
    assert plan_rows([5, 3, 4, 2, 1], budget=10, pack=False, fixed_shape=False) == [[[0], [2]], [[1], [3], [4]]]


@pytest.mark.parametrize("min_count, multiple_of", [(1, 1), (3, 2)], ids=["own_shapes", "pipeline_sp"])
def test_thd_micro_batches(min_count, multiple_of):
    """Packed micro-batches: one row, cu_seqlens at the sequences' boundaries and covering the padding in
    pieces no longer than the longest sequence; every token where it was."""
    from types import SimpleNamespace

    from rlv_megatron.train.packing import lengths, micro_batches

    batch = synthetic_batch()
    lens = lengths(batch)
    cfg = SimpleNamespace(micro_batch_tokens=64, pack=True, share_prompts=False)
    mbs = micro_batches(batch, {"target": batch.targets}, cfg, multiple_of, min_count=min_count)
    assert len(mbs) >= max(min_count, 2) and all(mb.tokens.shape[0] == 1 for mb in mbs)
    if min_count > 1:
        assert len({mb.tokens.shape for mb in mbs}) == 1  # pipelines need one shape
    assert sorted(int(i) for mb in mbs for i in mb.seq.unique() if i >= 0) == list(range(len(batch)))
    for mb in mbs:
        S = mb.tokens.shape[1]
        cu = mb.cu_seqlens.tolist()
        assert mb.attention_mask is None and S % multiple_of == 0 and cu[0] == 0 and cu[-1] == S
        seq, pos = mb.seq[0], mb.pos[0]
        real = [(cu[j], cu[j + 1]) for j in range(len(cu) - 1) if seq[cu[j]] >= 0]
        longest = max((b - a for a, b in real), default=S)
        for a, b in zip(cu, cu[1:]):
            ids = seq[a:b].unique().tolist()
            assert len(ids) == 1  # one sequence (or padding) per THD sequence
            if ids[0] >= 0:
                assert b - a == lens[ids[0]] and torch.equal(pos[a:b], torch.arange(b - a))
                assert torch.equal(mb.tokens[0, a:b], batch.tokens[ids[0], :b - a])
            else:
                assert b - a <= min(longest, 128)
        params = mb.packed_seq_params()
        assert params.qkv_format == "thd" and params.max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
        assert params.cu_seqlens_q.dtype == torch.int32  # what TransformerEngine takes


def test_shared_prompt_layout():
    """A prompt's samples become one unit: the prompt's inputs but its last once, then each sample from the
    last prompt token on, at its own positions; a sample sees the shared part and itself only."""
    from types import SimpleNamespace

    from rlv_megatron.models.segments import dense_mask
    from rlv_megatron.train.packing import computed_tokens, lengths, micro_batches

    batch = grouped_batch(prompts=2, group=3)
    first = batch.response_mask.float().argmax(1)
    cfg = SimpleNamespace(micro_batch_tokens=4096, pack=False, share_prompts=True)
    mbs = micro_batches(batch, {"target": batch.targets}, cfg)
    rows = [(mb, r) for mb in mbs for r in range(len(mb.tokens))]
    assert len(rows) == 2 and all(mb.shares_prompts for mb in mbs)
    n_tokens = sum(mb.num_tokens for mb in mbs)
    assert n_tokens == int((batch.verify_pos + 1).sum()) - 2 * 2 * int(first[0])  # 2 of 3 prompt copies saved
    assert computed_tokens(batch, cfg) == n_tokens  # what the dashboards' FLOPs count
    split = SimpleNamespace(**{**vars(cfg), "micro_batch_tokens": int(lengths(batch)[0]) * 2})
    assert computed_tokens(batch, split) == sum(mb.num_tokens for mb in micro_batches(batch, {}, split))
    for mb, r in rows:
        seq, pos, allowed = mb.seq[r], mb.pos[r], ~dense_mask(mb.attention_mask, *mb.tokens.shape)[r, 0]
        valid = seq >= 0
        assert torch.equal(mb.tokens[r][valid], batch.tokens[seq[valid], pos[valid]])  # each token where it was
        assert torch.equal(mb.fields["target"][r][valid], batch.targets[seq[valid], pos[valid]])
        f = int(first[seq[0]])
        assert torch.equal(pos[:f], torch.arange(f))  # the shared part
        for i in seq[f:][valid[f:]].unique():
            mine = (seq == i) & (torch.arange(len(seq)) >= f)
            q = int(mine.nonzero()[-1])  # its last token sees the shared part and itself, nothing else
            assert torch.equal(allowed[q], valid & ((torch.arange(len(seq)) < f) | mine))
            assert pos[mine][0] == f  # restarts at the last prompt token's position


def reference_worker(model_dir, agg, off_policy):
    """The micro-batched, vocab-parallel loss against the whole-batch reference formulas on full logits."""
    from rlv_megatron.algos.losses import policy_loss, verifier_loss
    from rlv_megatron.config import Config
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.heads import output_logits
    from rlv_megatron.train.step import rl_objective, score, sft_objective

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.train.micro_batch_tokens = 64
    cfg.algo.loss_agg, cfg.algo.max_tokens, cfg.algo.temperature = agg, 24, 0.7
    cfg.algo.off_policy = off_policy
    cfg.optim.lr = 0.0  # both objectives see the same weights
    policy = Policy(cfg)
    batch = synthetic_batch()
    with torch.no_grad(), output_logits(policy.model):
        logits = policy.model(batch.tokens, torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens), None)
    logits = logits[..., :policy.vocab].double()
    lp_t = torch.log_softmax(logits / 0.7, -1).gather(-1, batch.targets[..., None])[..., 0]
    old = lp_t.float() + 0.2 * torch.sin(torch.arange(lp_t.numel()).view_as(lp_t).float())
    answer = logits[torch.arange(len(batch)), batch.verify_pos]
    a = cfg.algo
    w = torch.exp(old - batch.rollout_logp)[batch.policy_mask]
    a.tis_cap = float(w.median())  # half the tokens past the cap: truncated or dropped
    pol = policy_loss(lp_t, old.double(), batch.advantages.double(), batch.policy_mask, a.clip_low, a.clip_high,
                      agg, a.max_tokens, batch.rollout_logp.double(), a.tis_cap, off_policy=off_policy)
    ver = verifier_loss(answer, batch.verify_label, YES, NO, "full", batch.verify_weight)
    sft_ref = -(lp_t.new_tensor(0) + torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None])[..., 0]
                [batch.policy_mask].mean()) + ver
    got_old, _ = score(policy.chunks, batch, policy.vocab, 0.7, YES, NO, cfg.train, policy.groups)
    stats = policy.train_step(batch, rl_objective(batch, old, a, cfg.verifier, policy.vocab, YES, NO))
    sft = policy.train_step(batch, sft_objective(batch, policy.vocab, YES, NO, "full"))
    return {"old_err": (got_old - lp_t.float())[batch.response_mask].abs().max().item(),
            "policy": (stats["loss/policy"], pol.loss.item()), "verifier": (stats["loss/verifier"], ver.item()),
            "clip": (stats["policy/clip_fraction"], pol.clip_fraction.item()),
            "sft": (sft["sft/token_ce"] + sft["sft/verifier_ce"], sft_ref.item())}


FORMULAS = [("token_mean", "truncated_is"), ("seq_mean", "masked_is"), ("constant", "behaviour_ratio")]


@pytest.fixture(scope="module")
def formulas(qwen) -> dict[tuple, dict]:
    results = run_distributed_in_turn(reference_worker, 1, [(qwen, agg, off) for agg, off in FORMULAS])
    return {case: r[0] for case, r in zip(FORMULAS, results)}


@pytest.mark.slow
@pytest.mark.parametrize("agg, off_policy", FORMULAS)
def test_micro_batched_loss_equals_the_whole_batch_formulas(formulas, agg, off_policy):
    r = formulas[agg, off_policy]
    assert r["old_err"] < 1e-5
    for k in ("policy", "verifier", "clip"):
        assert r[k][0] == pytest.approx(r[k][1], abs=1e-5), k
    assert r["sft"][0] == pytest.approx(r["sft"][1], abs=1e-5)


def bf16_worker(model_dir, dtype):
    from rlv_megatron.config import Config
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import rl_objective, score

    cfg = Config()
    cfg.model.path, cfg.model.params_dtype = str(model_dir), dtype
    policy = Policy(cfg)
    batch = synthetic_batch()
    out = []
    for _ in range(2):
        old, _ = score(policy.chunks, batch, policy.vocab, 1.0, YES, NO, cfg.train, policy.groups)
        out.append(policy.train_step(batch, rl_objective(batch, old, cfg.algo, cfg.verifier, policy.vocab, YES, NO)))
    return out


@pytest.mark.slow
def test_bf16_training_follows_fp32(qwen):
    """bf16 weights with megatron's fp32 master copy and fp32 grads: the same steps to bf16 precision."""
    fp32, bf16 = (r[0] for r in run_distributed_in_turn(bf16_worker, 1, [(qwen, "float32"), (qwen, "bfloat16")]))
    for a, b in zip(fp32, bf16):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=2e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2)
    assert bf16[1]["loss/total"] < bf16[0]["loss/total"]  # it trains


def test_shared_prompts_fall_back_under_transformer_engine_saying_so(monkeypatch, tmp_path, capsys):
    """A shared prompt's samples attend outside their own sequence, which THD cannot express: on by default,
    the sharing is turned off under TE with a note, before the model is built."""
    from rlv_megatron.train import policy as policy_mod
    from rlv_megatron.config import Config
    from rlv_megatron.models.tiny import make_hf_model

    class Built(Exception):
        pass

    def build_model(*args):
        raise Built(cfg.train.share_prompts)

    monkeypatch.setattr(policy_mod, "resolve_impl", lambda model_cfg: "te")
    monkeypatch.setattr(policy_mod, "build_model", build_model)
    cfg = Config()
    cfg.model.path = str(make_hf_model("qwen2", tmp_path / "m"))
    assert cfg.train.share_prompts  # the default
    with pytest.raises(Built) as built:
        policy_mod.Policy(cfg)
    assert built.value.args == (False,)
    assert "train.share_prompts: off under model.impl=te" in capsys.readouterr().err
