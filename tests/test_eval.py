"""`rlv eval` without an engine: equivalence grouping, sequential scaling and compute efficiency against brute
force, pool files (errors name file:line), and `rlv eval --pool` outputs."""

import dataclasses
import itertools
import json
import re
from fractions import Fraction

import numpy as np
import pytest

from rlv_megatron.eval import scaling
from rlv_megatron.config import ConfigError, EvalConfig
from rlv_megatron.eval import app, sequential
from rlv_megatron.eval.equivalence import AnswerKeys, math_key
from rlv_megatron.eval.metrics import UNDEFINED_FOR_REWARDS, efficiency, pool_report, samples_to_reach
from rlv_megatron.eval.pool_io import PoolError, read_pool, write_pool
from rlv_megatron.hydra_app import compose
from rlv_megatron.tasks.graders import GraderPool
from rlv_megatron.tasks.math_data import DataError, load_math


@pytest.fixture(scope="module")
def keys():
    with AnswerKeys(workers=2, timeout_s=10.0) as k:
        yield k


def row(pid, answer, correct, score, length=5, budget=None, lp=-0.5):
    r = {"problem_id": pid, "answer": answer, "correct": correct, "score": score, "length": length,
         "logprob_mean": lp, "task": "math"}
    return r if budget is None else {**r, "max_tokens": budget}


# ------------------------------------------------------------------ equivalence grouping

def test_math_key_groups_equivalent_forms_only():
    same = [[r"\frac{1}{2}", "0.5", r"\dfrac12", "1/2", r"\tfrac{1}{2}"], [r"2\sqrt{2}", r"\sqrt{8}"],
            ["x+1", "1+x"], ["(x+1)^2", "x^2+2x+1"], [r"\{1,2\}", r"\{2,1\}"], ["x=5", "5", "5.0"],
            ["1,000", "1000"], [r"90^\circ", "90"], [r"\frac{\pi}{2}", r"\pi/2"]]
    for group in same:
        assert len({math_key(a) for a in group}) == 1, group
    heads = [math_key(g[0]) for g in same] + [math_key(a) for a in ("y+1", "(1,2)", "[1,2)", "2", "0.5001", "x^2")]
    assert len(set(heads)) == len(heads)  # nothing else merges


def test_vote_keys_group_and_cache(keys, tmp_path):
    pool = [[row("p", r"\frac{1}{2}", True, 0.5), row("p", "0.5", True, 0.5), row("p", "1/2", True, 0.5),
             row("p", "7", False, 0.9), row("p", "7.0", False, 0.9), row("p", None, False, 0.99),
             row("p", r"\sqrt{8}", False, 0.1), row("p", r"2\sqrt{2}", False, 0.1)]]
    votes = keys.vote_keys("math", pool)[0]
    assert votes[:3] == [("correct",)] * 3 and votes[5] is None
    assert votes[3] == votes[4] and votes[6] == votes[7] and votes[3] != votes[6]
    computed = keys.stats["computed"]
    assert keys.vote_keys("math", pool)[0] == votes and keys.stats["computed"] == computed  # cached
    # strings alone: 7 and 7.0 would split, and the correct answer's three forms would not add up
    samples = [scaling.Sample(v, r["correct"], r["score"]) for r, v in zip(pool[0], votes)]
    assert scaling.majority_at_k(samples, 8) == 1.0  # 3 correct vs 2 + 2 wrong
    assert scaling.weighted_at_k(samples, 8) == 0.0  # 1.5 vs 1.8: the verifier prefers 7
    as_strings = [scaling.Sample(r["answer"], r["correct"], r["score"]) for r in pool[0]]
    assert scaling.majority_at_k(as_strings, 8) == pytest.approx(3 / 7)  # 7 singletons tie, 3 correct
    # other tasks key on the string; the disk cache comes back
    assert keys.vote_keys("gsm8k", [[row("p", "7", False, 0.1)]])[0] == [("wrong", "7")]
    with AnswerKeys(workers=1, cache_path=tmp_path / "keys.json") as disk:
        disk.keys("math", ["0.5"])
        disk.save()
    with AnswerKeys(workers=1, cache_path=tmp_path / "keys.json") as disk:
        assert disk.keys("math", ["0.5"]) == {"0.5": math_key("0.5")} and disk.stats["computed"] == 0
    # a cache from an older canonicaliser (before percent signs were dropped) is not trusted
    (tmp_path / "keys.json").write_text(json.dumps({"math": {"25\\%": "str:25\\%"}}))
    with AnswerKeys(workers=1, cache_path=tmp_path / "keys.json") as disk:
        assert disk.keys("math", ["25\\%"]) == {"25\\%": math_key("25")} and disk.stats["computed"] == 1


def test_grouping_never_merges_math500_answers_the_grader_tells_apart(keys):
    problems = load_math("math500/test")
    golds = [p.answer for p in problems]
    got = keys.keys("math", golds)
    assert keys.stats["timeouts"] == 0 and len(got) == len(set(golds))
    pairs = [(a, b) for a, b in itertools.combinations(sorted(set(golds)), 2) if got[a] == got[b]]
    with GraderPool("math", workers=2, timeout_s=10.0) as pool:
        scores, _ = pool.grade([f"\\boxed{{{b}}}" for _, b in pairs], [a for a, _ in pairs])
    assert [p for p, s in zip(pairs, scores) if s != 1.0] == []
    assert len(pairs) > 0  # e.g. the same number written two ways


# ------------------------------------------------------------------ sequential scaling

def random_pool(rng, n, alphabet=3):
    return [scaling.Sample(None if (a := int(rng.integers(-1, alphabet))) < 0 else a, a == 0,
                           float(rng.integers(0, 5)) / 4) for _ in range(n)]


def brute_vote(samples):
    weight = {}
    for s in samples:
        if s.answer is not None:
            weight[s.answer] = weight.get(s.answer, Fraction(0)) + Fraction(s.score)
    if not weight:
        return Fraction(0), Fraction(0)
    winners = [a for a, w in weight.items() if w == max(weight.values())]
    scores = [Fraction(s.score) for s in samples if s.answer in winners]
    return Fraction(sum(a == 0 for a in winners), len(winners)), sum(scores) / len(scores)


def test_whole_pool_vote_matches_brute_force_and_weighted_at_n():
    rng = np.random.default_rng(0)
    for _ in range(200):
        pool = random_pool(rng, 6)
        credit, conf = sequential.vote(pool)
        want_credit, want_conf = brute_vote(pool)
        assert credit == pytest.approx(float(want_credit)) and conf == pytest.approx(float(want_conf))
        assert credit == pytest.approx(scaling.weighted_at_k(pool, 6))


def test_adaptive_matches_a_per_problem_loop():
    rng = np.random.default_rng(1)
    budgets = [4, 8, 16]
    pools = {b: [random_pool(rng, 5) for _ in range(7)] for b in budgets}
    lengths = {b: [list(rng.integers(1, b + 1, 5)) for _ in range(7)] for b in budgets}
    taus = [0.0, 0.3, 0.6, 1.01]
    got = sequential.adaptive(pools, lengths, taus)
    for tau, g in zip(taus, got):
        acc, tok, bud = [], [], []
        for i in range(7):
            for b in budgets:  # raise the budget until the winner's confidence reaches tau
                credit, conf = brute_vote(pools[b][i])
                if conf >= Fraction(tau) or b == budgets[-1]:
                    break
            acc.append(credit), tok.append(sum(lengths[b][i])), bud.append(b)
        assert g == pytest.approx({"tau": tau, "accuracy": float(np.mean([float(a) for a in acc])),
                                   "tokens": float(np.mean(tok)), "mean_budget": float(np.mean(bud))})
    assert got[0]["mean_budget"] == 4 and got[-1]["mean_budget"] == 16  # tau 0 stops at once, 1.01 never


def test_best_strategy_picks_the_highest_and_breaks_ties_in_order():
    m = {"majority@8": 0.5, "weighted@8": 0.6, "best_of@8": 0.6, "weighted_likelihood@8": 0.55, "pass@8": 0.9}
    assert sequential.best_strategy(m, 8) == {"strategy": "weighted", "accuracy": 0.6, "k": 8}
    with pytest.raises(ValueError, match="k=4"):
        sequential.best_strategy(m, 4)


# ------------------------------------------------------------------ compute efficiency

def test_samples_to_reach_interpolates_in_log2_k():
    curve = {1: 0.2, 2: 0.3, 4: 0.5, 8: 0.7}
    assert samples_to_reach(curve, 0.1) == 1.0
    assert samples_to_reach(curve, 0.5) == 4.0
    assert samples_to_reach(curve, 0.6) == pytest.approx(2 ** 2.5)
    assert samples_to_reach(curve, 0.71) is None
    assert samples_to_reach({1: 0.5, 2: 0.4, 4: 0.6}, 0.55) == pytest.approx(2 ** 1.75)  # first crossing


def test_efficiency_against_brute_force_majority_curve():
    """Baseline majority@k enumerated over all subsets; the samples it needs found by a fine scan of log2 k."""
    rng = np.random.default_rng(2)
    for _ in range(10):
        base = random_pool(rng, 8, alphabet=4)
        curve = {k: scaling.majority_at_k(base, k) for k in (1, 2, 4, 8)}
        weighted = {k: curve[k] + d for k, d in zip((1, 2, 4, 8), rng.uniform(-0.1, 0.2, 4))}
        eff = efficiency({f"weighted@{k}": v for k, v in weighted.items()},
                         {f"majority@{k}": v for k, v in curve.items()})
        grid = np.linspace(0, 3, 30001)  # log2 k
        values = np.interp(grid, [0, 1, 2, 3], [curve[k] for k in (1, 2, 4, 8)])
        for k, e in eff.items():
            hits = np.nonzero(values >= weighted[k] - 1e-12)[0]
            if hits.size == 0:
                assert e["baseline_samples"] is None and e["factor"] is None
            else:
                assert np.log2(e["baseline_samples"]) == pytest.approx(grid[hits[0]], abs=2e-4)
                assert e["factor"] == pytest.approx(e["baseline_samples"] / k)


# ------------------------------------------------------------------ pool files and --pool

def two_budget_rows(rng):
    rows = []
    for b in (8, 16):
        for p in range(6):
            for _ in range(4):
                right = rng.random() < 0.4
                answer = None if rng.random() < 0.1 else ("0.5" if right else str(int(rng.integers(1, 4))))
                rows.append(row(f"p{p}", answer, right and answer is not None, float(rng.integers(0, 9)) / 8,
                                int(rng.integers(1, b + 1)), b, float(-rng.random())))
    return rows


def test_pool_report_equals_scaling_on_the_grouped_pool(keys, tmp_path):
    rows = two_budget_rows(np.random.default_rng(3))
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pools = read_pool(path)
    assert sorted(pools) == [8, 16] and all(len(p) == 6 and len(p[0]) == 4 for p in pools.values())
    cfg = EvalConfig(subsets=50, seed=7, taus=[0.5])
    rep = pool_report(pools, cfg, keys)
    for b in (8, 16):
        samples = [[scaling.Sample(None if r["answer"] is None else ("correct",) if r["correct"] else r["answer"],
                                   r["correct"], r["score"], r["logprob_mean"]) for r in rows] for rows in pools[b]]
        want = scaling.evaluate(samples, [1, 2, 4], subsets=50, seed=7)
        assert {k: v for k, v in rep["budgets"][str(b)].items() if k in want} == pytest.approx(want, nan_ok=True)
        assert rep["best_strategy"][str(b)]["k"] == 4
    assert [a["tau"] for a in rep["adaptive"]] == [0.5]
    with pytest.raises(ValueError, match="eval.strategy_k=5"):
        pool_report(pools, EvalConfig(strategy_k=5), keys)
    # write_pool round-trips
    write_pool(tmp_path / "again.jsonl", pools)
    assert read_pool(tmp_path / "again.jsonl") == pools


@pytest.mark.parametrize("line,message", [
    ('{"problem_id": "p", "answer": "1", "correct": true, "score": 0.5', "invalid JSON"),
    ('{"problem_id": "p", "answer": "1", "correct": true, "length": 3}', "missing field 'score'"),
    ('{"problem_id": "p", "answer": "1", "correct": 1, "score": 0.5, "length": 3}', "field 'correct' is 1"),
    ('{"problem_id": "p", "answer": 1, "correct": true, "score": 0.5, "length": 3}', "field 'answer' is 1"),
    ('{"problem_id": "p", "answer": "1", "correct": true, "score": 1.5, "length": 3}',
     "field 'score' is 1.5, outside [0, 1] for eval.score_kind=probability (declare eval.score_kind=logit or reward"),
    ('{"problem_id": "p", "answer": "1", "correct": true, "score": NaN, "length": 3}',
     "field 'score' is nan, expected a finite number"),
    ('{"problem_id": "p", "answer": "1", "correct": true, "score": 0.5, "length": 3, "logprob_mean": -Infinity}',
     "field 'logprob_mean' is -inf, expected a finite number"),
    ('{"problem_id": "p", "answer": "1", "correct": true, "score": 0.5, "length": -1}',
     "field 'length' is -1, expected >= 0"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_pool_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps(row("p", "1", True, 0.5))
    path = tmp_path / "pool.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=rf"pool\.jsonl:3: .*{re.escape(message)}"):  # PoolError is one
        read_pool(path)


@pytest.mark.parametrize("score,ok", [(-3.2, True), (1e300, True), (10 ** 400, False), (float("inf"), False),
                                      (float("nan"), False)])
def test_unbounded_kinds_take_any_finite_score(tmp_path, score, ok):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps(row("p", "1", True, 0.5)) + "\n" + json.dumps(row("p", "2", False, score)) + "\n")
    for kind in ("logit", "reward"):
        if ok:
            assert read_pool(path, kind)[None][0][1]["score"] == score
        else:
            message = rf"pool\.jsonl:2: field 'score' is {re.escape(repr(score))}, expected a finite number"
            with pytest.raises(PoolError, match=message):
                read_pool(path, kind)
    with pytest.raises(PoolError, match=r"pool\.jsonl:2: field 'score' is "):
        read_pool(path)  # probability: [0, 1]


def test_ragged_pool_is_refused(tmp_path):
    path = tmp_path / "pool.jsonl"
    rows = [row("a", "1", True, 0.5), row("a", "2", False, 0.5), row("b", "1", True, 0.5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PoolError, match=r"pool\.jsonl:3: problem 'b' has 1 samples, others 2"):
        read_pool(path)


def _cli(*args):
    from tests.cli import rlv

    return rlv("eval", *args)


def test_cli_pool_recompute_writes_every_output(tmp_path):
    rows = two_budget_rows(np.random.default_rng(4))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    done = _cli("--pool", str(pool), "--baseline", str(pool), "--out", str(out), "eval.subsets=20",
                "task.grader_workers=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out / "metrics.json")
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep["budgets"]) == {"8", "16"} and rep["budgets"]["16"]["samples"] == 4
    assert {"best_strategy", "adaptive", "efficiency", "baseline", "grouping"} <= set(rep)
    assert rep["efficiency"]["8"]["1"]["factor"] == 1.0  # weighted@1 = majority@1 = pass@1, same pool
    md = (out / "report.md").read_text()
    assert "| k | pass | majority | weighted | best_of | weighted_likelihood | best_of_likelihood |" in md
    assert "## Adaptive length" in md and "## Compute efficiency" in md
    for png in ("accuracy_vs_samples.png", "accuracy_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    steps = {e.step: e.value for e in tb.Scalars("max_tokens_16/weighted")}
    assert steps == pytest.approx({k: rep["budgets"]["16"][f"weighted@{k}"] for k in (1, 2, 4)})
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # the same pool again gives the same numbers (seeded subsets, cached keys)
    assert _cli("--pool", str(pool), "--out", str(out), "eval.subsets=20").returncode == 0
    assert json.loads((out / "metrics.json").read_text())["budgets"] == rep["budgets"]


def test_cli_errors_exit_non_zero_naming_the_problem(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps(row("p", "1", True, 0.5)) + "\n" + '{"problem_id": "p"}\n')
    done = _cli("--pool", str(pool), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and f"{pool}:2: missing field 'answer'" in done.stderr
    assert not (tmp_path / "out").exists()
    done = _cli("--pool", str(pool), "eval.no_such_field=1")
    assert done.returncode == 2 and "no_such_field" in done.stderr
    done = _cli(str(tmp_path))  # neither a HF directory nor a checkpoint
    assert done.returncode == 2 and "neither a Hugging Face model directory" in done.stderr
    done = _cli()
    assert done.returncode == 2 and "give a model" in done.stderr


# ------------------------------------------------------------------ sampling (a scripted engine)

class ScriptedEngine:
    """generate: fixed responses per prompt; score_yes: a function of the verification input."""

    def __init__(self, responses):
        self.responses, self.scored = responses, []

    def generate(self, prompts, n, temperature, max_tokens, stop_token_ids, seeds):
        from rlv_megatron.rollout.engine import Sample

        return [[Sample(ids[:max_tokens], [-0.1 * (j + 1)] * len(ids[:max_tokens]), "stop") for j, ids in
                 enumerate(self.responses[i][:n])] for i in range(len(prompts))]

    def score_yes(self, prompts, yes_id, no_id=None):
        self.scored += prompts
        return [(sum(p) % 97) / 97 for p in prompts]


def test_sample_pools_equal_one_sample_at_a_time():
    """Cut once per budget, graded once per distinct answer, scored once per distinct cut: the rows equal
    grading and scoring every (budget, sample) on its own."""
    from rlv_megatron.config import TaskConfig
    from rlv_megatron.eval.sampling import sample_pools
    from rlv_megatron.tasks import subset_sum as ss
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task

    task = make_task(TaskConfig(), "q", num_eval=2)
    fmt = ChatFormat(task.tokenizer, "q")
    enc = lambda s: task.tokenizer.encode(s, add_special_tokens=False) + [fmt.eos_id]  # noqa: E731
    p0, p1 = task.eval
    texts = [["1+2=99", ss.trace(p0.subset), "1+2=3;3+4=7", "x"],  # trace(): a correct solution, 8+ tokens
             ["1+2=3", "1+2=3", "5+5=10;10+1=11", ss.trace(p1.subset)]]
    engine = ScriptedEngine([[enc(t) for t in ts] for ts in texts])
    cfg = EvalConfig(samples=4)
    pools = sample_pools(engine, fmt, task, task.eval, cfg, [4, 64, 8])
    assert sorted(pools) == [4, 8, 64]
    distinct_cuts = {(i, j, min(len(enc(t)), b)) for b in (4, 8, 64) for i, ts in enumerate(texts)
                     for j, t in enumerate(ts)}
    assert len(engine.scored) == len(distinct_cuts)  # each distinct cut scored once
    for b, pool in pools.items():
        for i, (problem, rows) in enumerate(zip(task.eval, pool)):
            for j, r in enumerate(rows):
                ids = enc(texts[i][j])[:b]
                text = fmt.decode(ids)
                verify = fmt.verify_ids(fmt.prompt_ids(problem.prompt), ids)
                assert r == {"problem_id": problem.id, "sample": text, "answer": task.answer_key(text),
                             "correct": task.grade([text], [problem.answer])[0][0] == 1.0,
                             "score": (sum(verify) % 97) / 97, "length": len(ids),
                             "logprob_mean": pytest.approx(-0.1 * (j + 1)), "max_tokens": b, "task": "subset_sum"}
    assert [r["correct"] for r in pools[64][0]] == [False, True, False, False]
    assert [r["correct"] for r in pools[4][0]] == [False, False, False, False]  # cut short of the answer


# ------------------------------------------------------------------ score kinds (docs/eval-scores.md)

def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def scored_rows(rng, scores, budgets=(8, 16), problems=5, n=6):
    """Rows with answers "0.5" (correct), "1".."3" or None, and scores drawn by `scores(rng)`."""
    rows = []
    for b in budgets:
        for p in range(problems):
            for _ in range(n):
                a = int(rng.integers(-1, 4))
                answer = None if a < 0 else "0.5" if a == 0 else str(a)
                rows.append(row(f"p{p}", answer, a == 0, float(scores(rng)), int(rng.integers(1, b + 1)), b,
                                float(-rng.random())))
    return rows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_logit_kind_equals_probability_kind_on_sigmoid_scores(keys, tmp_path):
    rng = np.random.default_rng(11)
    rows = scored_rows(rng, lambda g: g.integers(-12, 13) / 2)  # a grid: ties in votes and in best-of
    assert min(r["score"] for r in rows) < -3 and max(r["score"] for r in rows) > 3
    logit = read_pool(write_rows(tmp_path / "logit.jsonl", rows), "logit")
    prob = read_pool(write_rows(tmp_path / "prob.jsonl", [{**r, "score": sigmoid(r["score"])} for r in rows]))
    cfg = EvalConfig(subsets=40, seed=3, taus=[0.4, 0.6, 0.8])
    got = pool_report(logit, dataclasses.replace(cfg, score_kind="logit"), keys)
    want = pool_report(prob, cfg, keys)
    assert got["budgets"].keys() == want["budgets"].keys() == {"8", "16"}
    for b in got["budgets"]:
        assert got["budgets"][b] == pytest.approx(want["budgets"][b], nan_ok=True)
    assert len(got["adaptive"]) == 3 and all(g == pytest.approx(w) for g, w in zip(got["adaptive"], want["adaptive"]))
    assert got["scores"]["kind"] == "logit" and got["budgets"]["8"]["verifier_ece"] > 0


def brute_force(samples, k, temperature):
    """best-of@k and softmax-weighted@k of a reward pool over every k-subset, straight from the definitions."""
    best, weighted = [], []
    for sub in itertools.combinations(samples, k):
        valid = [s for s in sub if s.answer is not None]
        if not valid:
            best.append(0.0), weighted.append(0.0)
            continue
        top = max(s.score for s in valid)
        best.append(np.mean([s.correct for s in valid if s.score == top]))
        z = sum(np.exp(s.score / temperature) for s in valid)
        vote = {}
        for s in valid:
            vote[s.answer] = vote.get(s.answer, 0.0) + np.exp(s.score / temperature) / z
        winners = [a for a, v in vote.items() if v >= max(vote.values()) * (1 - 1e-9)]
        weighted.append(np.mean([a == 0 for a in winners]))
    return float(np.mean(best)), float(np.mean(weighted))


def reward_pool(rng, n=7):
    return [scaling.Sample(None if (a := int(rng.integers(-1, 3))) < 0 else a, a == 0,
                           float(rng.integers(-8, 9)) * 1.5) for _ in range(n)]  # ties, negatives


def test_reward_best_of_and_weighted_match_brute_force():
    rng = np.random.default_rng(12)
    for _ in range(30):
        pool = reward_pool(rng)
        temperature = float(rng.choice([0.5, 2.0, 10.0]))
        m = scaling.evaluate([pool], [1, 2, 4, 7], subsets=5, kind="reward", temperature=temperature)
        for k in (1, 2, 4, 7):
            best, weighted = brute_force(pool, k, temperature)
            assert m[f"best_of@{k}"] == pytest.approx(best)
            exact = scaling.weighted_at_k(pool, k, kind="reward", temperature=temperature)
            assert exact == pytest.approx(weighted)
        assert m["weighted@7"] == pytest.approx(brute_force(pool, 7, temperature)[1])  # one subset: the pool
        assert m["verifier_ece"] is None and m["verifier_accuracy"] is None
        pos = [s.score for s in pool if s.correct and s.answer is not None]
        neg = [s.score for s in pool if not (s.correct and s.answer is not None)]
        pairs = [(a > b) + 0.5 * (a == b) for a in pos for b in neg]  # Mann-Whitney on the raw rewards
        assert m["verifier_auc_pooled"] == pytest.approx(np.mean(pairs) if pairs else np.nan, nan_ok=True)


def test_reward_weights_are_shift_invariant_and_span_best_of_to_majority():
    rng = np.random.default_rng(13)
    for _ in range(30):
        ranks = rng.permutation(7)  # distinct rewards 1.5 apart, so best-of has no ties
        pool = [dataclasses.replace(s, score=1.5 * float(r) - 4.0) for s, r in zip(reward_pool(rng), ranks)]
        shifted = [dataclasses.replace(s, score=s.score + 5000.0) for s in pool]  # exp(5000) would overflow
        for k in (2, 4, 7):
            w = scaling.weighted_at_k(pool, k, kind="reward", temperature=1.0)
            assert w == pytest.approx(brute_force(pool, k, 1.0)[1])
            assert scaling.weighted_at_k(shifted, k, kind="reward", temperature=1.0) == pytest.approx(w)
            # T -> 0: the answer of the top reward wins (best-of); T -> inf: every weight 1 (majority)
            cold = scaling.weighted_at_k(pool, k, kind="reward", temperature=0.05)
            assert cold == pytest.approx(brute_force(pool, k, 1.0)[0])
            hot = scaling.weighted_at_k(pool, k, kind="reward", temperature=1e12)
            assert hot == pytest.approx(scaling.majority_at_k(pool, k))


def test_cli_reward_pool_evaluates_with_the_declared_kind_and_refusals_leave_no_out(tmp_path):
    rng = np.random.default_rng(14)
    rows = scored_rows(rng, lambda g: g.normal(0, 4) * 10, budgets=(8,), n=4)  # unbounded, negative
    rows[5]["score"] = -3.2
    pool = write_rows(tmp_path / "rm.jsonl", rows)
    line = next(i for i, r in enumerate(rows, 1) if not 0 <= r["score"] <= 1)
    out = tmp_path / "a" / "b" / "out"
    done = _cli("--pool", str(pool), "--out", str(out), "task.grader_workers=1")
    assert done.returncode == 2
    assert (f"{pool}:{line}: field 'score' is {rows[line - 1]['score']!r}, outside [0, 1] for "
            "eval.score_kind=probability (declare eval.score_kind=logit or reward") in done.stderr
    assert not (tmp_path / "a").exists()  # not even the parents
    done = _cli("--pool", str(pool), "--out", str(out), "eval.score_kind=reward", "eval.reward_temperature=0")
    assert done.returncode == 2 and "eval.reward_temperature=0.0: must be a finite number > 0" in done.stderr
    done = _cli("--pool", str(pool), "--out", str(out), "eval.score_kind=reward", "eval.reward_temperature=3",
                "eval.subsets=10", "task.grader_workers=1")
    assert done.returncode == 0, done.stderr[-3000:]
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["scores"] == {"kind": "reward", "doc": "docs/eval-scores.md", "reward_temperature": 3.0,
                             "undefined": UNDEFINED_FOR_REWARDS}
    m = rep["budgets"]["8"]
    assert m["verifier_ece"] is None and m["verifier_accuracy"] is None
    problems = [[scaling.Sample(None if r["answer"] is None else r["answer"] if not r["correct"] else 0, r["correct"],
                                r["score"]) for r in rows[i:i + 4]] for i in range(0, len(rows), 4)]
    for k in (1, 2, 4):
        want = np.mean([brute_force(p, k, 3.0) for p in problems], axis=0)
        assert m[f"best_of@{k}"] == pytest.approx(want[0])
    assert m["weighted@4"] == pytest.approx(want[1])
    assert "eval.score_kind=reward" in (out / "report.md").read_text()
    # a refusal after the rows are read (k > N) leaves a fresh --out uncreated and an old one as it was
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(ConfigError, match="eval.strategy_k=9"):
            app.run(compose("eval", ["eval.score_kind=reward", "eval.strategy_k=9", "task.grader_workers=1"]),
                    pool=str(pool), out=str(target))
    assert not (tmp_path / "fresh").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(ConfigError, match="eval.score_kind=reward: a pool sampled from a model"):
        app.run(compose("eval", ["eval.score_kind=reward"]), model=str(tmp_path), out=str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
