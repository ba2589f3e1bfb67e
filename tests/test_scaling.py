"""Scaling metrics against brute force written independently here (exact Fractions, explicit subsets)."""

import itertools
import math
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest

from rlv_megatron.eval.scaling import (
    Sample,
    auc,
    best_of_k,
    calibration_error,
    evaluate,
    majority_at_k,
    pass_at_k,
    pooled_auc,
    powers_of_two_up_to,
    verifier_accuracy,
    weighted_at_k,
    within_prompt_auc,
)


# ------------------------------------------------------------------ brute force

def brute_pass(n, c, k):
    subs = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subs), len(subs))


def brute_best_of_subsets(scores, correct, k):
    """Per subset: credit = fraction correct among the samples tied at the subset's max score."""
    total = Fraction(0)
    subs = list(itertools.combinations(range(len(scores)), k))
    for s in subs:
        top = max(scores[i] for i in s)
        tied = [i for i in s if scores[i] == top]
        total += Fraction(sum(correct[i] for i in tied), len(tied))
    return total / len(subs)


def brute_best_of_orderings(scores, correct, k):
    """Average over every global tie-breaking order of the strict top-of-subset rule."""
    n = len(scores)
    subs = list(itertools.combinations(range(n), k))
    total, count = Fraction(0), 0
    for breaker in itertools.permutations(range(n)):
        rank = {i: (-scores[i], breaker[i]) for i in range(n)}
        total += Fraction(sum(correct[min(s, key=rank.get)] for s in subs), len(subs))
        count += 1
    return total / count


def brute_vote(samples, k, weighted):
    truth = {s.answer: s.correct for s in samples if s.answer is not None}
    subs = list(itertools.combinations(samples, k))
    total = Fraction(0)
    for sub in subs:
        votes = defaultdict(Fraction)
        for s in sub:
            if s.answer is not None:
                votes[s.answer] += Fraction(s.score) if weighted else 1
        if not votes:
            continue
        best = max(votes.values())
        tied = [a for a, v in votes.items() if v == best]
        total += Fraction(sum(truth[a] for a in tied), len(tied))
    return total / len(subs)


def brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def random_pool(rng, n, alphabet=4, p_invalid=0.2):
    """Answers 0..alphabet-1 (answer 0 correct) or None; scores on a 1/8 grid so ties happen and sums are exact."""
    pool = []
    for _ in range(n):
        a = None if rng.random() < p_invalid else int(rng.integers(alphabet))
        pool.append(Sample(a, a == 0, float(rng.integers(0, 9)) / 8, float(-rng.random())))
    return pool


# ------------------------------------------------------------------ pass@k

@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (6, 1, 3), (7, 3, 4), (8, 4, 5), (6, 2, 5), (4, 3, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass(n, c, k)), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0  # k = n: any correct sample is in the subset
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(512, 5, 256) == pytest.approx(1 - math.comb(507, 256) / math.comb(512, 256), rel=1e-12)
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ------------------------------------------------------------------ best-of-k

def test_best_of_distinct_scores():
    rng = np.random.default_rng(1)
    for _ in range(5):
        n = 7
        scores = list(rng.permutation(n) / n)
        correct = list(rng.random(n) < 0.4)
        for k in range(1, n + 1):
            expected = brute_best_of_subsets(scores, correct, k)
            assert best_of_k(scores, correct, k) == pytest.approx(float(expected), abs=1e-12)


def test_best_of_ties_equal_random_tie_breaking():
    scores = [0.5, 0.5, 0.5, 0.9, 0.1, 0.1]
    correct = [True, False, False, False, True, False]
    for k in range(1, len(scores) + 1):
        by_orderings = brute_best_of_orderings(scores, correct, k)
        assert by_orderings == brute_best_of_subsets(scores, correct, k)
        assert best_of_k(scores, correct, k) == pytest.approx(float(by_orderings), abs=1e-12)
    # all scores equal: every k gives the plain fraction correct
    assert best_of_k([0.3] * 4, [True, False, False, False], 3) == pytest.approx(0.25)


def test_best_of_random_ties():
    rng = np.random.default_rng(2)
    for _ in range(5):
        scores = list(rng.integers(0, 3, 6) / 2)
        correct = list(rng.random(6) < 0.5)
        for k in range(1, 7):
            assert best_of_k(scores, correct, k) == pytest.approx(
                float(brute_best_of_subsets(scores, correct, k)), abs=1e-12)


def test_best_of_bounds():
    assert best_of_k([0.9, 0.2, 0.4], [False, True, True], 1) == pytest.approx(2 / 3)  # k=1: mean correct
    assert best_of_k([0.9, 0.2, 0.4], [False, True, True], 3) == 0.0  # k=N: the global top
    with pytest.raises(ValueError, match="k=4"):
        best_of_k([0.1, 0.2, 0.3], [True, False, True], 4)


# ------------------------------------------------------------------ voting

def test_vote_exact_matches_brute_force():
    rng = np.random.default_rng(3)
    for n, alphabet in [(8, 4)] * 6 + [(11, 3), (12, 6), (10, 2)]:
        pool = random_pool(rng, n, alphabet=alphabet)
        for k in range(1, n + 1):
            assert majority_at_k(pool, k) == pytest.approx(float(brute_vote(pool, k, False)), abs=1e-12)
            assert weighted_at_k(pool, k) == pytest.approx(float(brute_vote(pool, k, True)), abs=1e-12)


def test_majority_counts_exactly_beyond_enumeration():
    """N=64, k=32: C(64, 32) ~ 1.8e18 subsets. Against closed forms: one correct answer among invalid
    samples wins whenever it is drawn (pass@k); of two answers of 32 samples each, by symmetry each wins
    half; of 40 against 24, the hypergeometric law."""
    one = [Sample("a", True, 0.5)] * 3 + [Sample(None, False, 0.5)] * 61
    assert majority_at_k(one, 32) == pytest.approx(pass_at_k(64, 3, 32), rel=1e-12)
    halves = [Sample("a", True, 0.5)] * 32 + [Sample("b", False, 0.5)] * 32
    assert majority_at_k(halves, 32) == pytest.approx(0.5, rel=1e-12)  # symmetric
    skewed = [Sample("a", True, 0.5)] * 40 + [Sample("b", False, 0.5)] * 24
    # a wins unless b is drawn more often: P(b > 16 of 32) by the hypergeometric law; ties (16-16) split
    hyper = [math.comb(24, y) * math.comb(40, 32 - y) / math.comb(64, 32) for y in range(25)]
    assert majority_at_k(skewed, 32) == pytest.approx(sum(hyper[:16]) + hyper[16] / 2, rel=1e-12)


def test_weighted_falls_back_to_random_subsets_beyond_max_exact():
    rng = np.random.default_rng(4)
    pool = random_pool(rng, 10, alphabet=3)
    for k in (2, 5):
        sampled = weighted_at_k(pool, k, max_exact=0, subsets=20000, rng=6)
        assert sampled == pytest.approx(weighted_at_k(pool, k), abs=0.02)
        assert sampled != weighted_at_k(pool, k)  # it did sample
    lik = weighted_at_k(pool, 5, key="likelihood", max_exact=0, subsets=20000, rng=7)
    assert lik == pytest.approx(weighted_at_k(pool, 5, key="likelihood"), abs=0.02)
    assert weighted_at_k(pool, 4, max_exact=0, rng=11) == weighted_at_k(pool, 4, max_exact=0,
                                                                        rng=np.random.default_rng(11))


def test_invalid_answers_never_vote():
    pool = [Sample(None, False, 0.99)] * 5 + [Sample("a", True, 0.2)] * 2 + [Sample("b", False, 0.1)]
    assert majority_at_k(pool, 8) == 1.0
    assert weighted_at_k(pool, 8) == 1.0
    # a subset with only invalid samples scores 0; the rest pick "a" or tie a/b
    assert majority_at_k(pool, 2) == pytest.approx(float(brute_vote(pool, 2, False)))
    assert majority_at_k([Sample(None, True, 1.0)] * 4, 2) == 0.0
    assert weighted_at_k([Sample(None, True, 1.0)] * 4, 4) == 0.0


def test_vote_ties_give_fraction_of_credit():
    # majority tie 2-2; weighted tie 0.5 vs 0.25 + 0.25
    pool = [Sample("a", True, 0.5), Sample("a", True, 0.0), Sample("b", False, 0.25), Sample("b", False, 0.25)]
    assert majority_at_k(pool, 4) == 0.5
    assert weighted_at_k(pool, 4) == 0.5
    # float sums equal in exact arithmetic still tie: 0.1 + 0.2 != 0.3 in binary
    pool = [Sample("a", True, 0.1), Sample("a", True, 0.2), Sample("b", False, 0.3)]
    assert weighted_at_k(pool, 3) == pytest.approx(0.5)
    # three-way tie with one correct answer
    pool = [Sample("a", True, 0.4), Sample("b", False, 0.4), Sample("c", False, 0.4)]
    assert majority_at_k(pool, 3) == pytest.approx(1 / 3)
    assert weighted_at_k(pool, 3) == pytest.approx(1 / 3)
    # all-zero weights: the present answers tie
    pool = [Sample("a", True, 0.0), Sample("b", False, 0.0)]
    assert weighted_at_k(pool, 2) == 0.5


def test_weighted_beats_majority_and_vice_versa():
    minority_right = [Sample("a", True, 0.9)] * 2 + [Sample("b", False, 0.1)] * 3
    assert majority_at_k(minority_right, 5) == 0.0
    assert weighted_at_k(minority_right, 5) == 1.0
    majority_right = [Sample("a", True, 0.1)] * 3 + [Sample("b", False, 0.9)] * 2
    assert majority_at_k(majority_right, 5) == 1.0
    assert weighted_at_k(majority_right, 5) == 0.0


def test_inconsistent_correctness_rejected():
    with pytest.raises(ValueError, match="both correct and wrong"):
        majority_at_k([Sample("a", True, 0.5), Sample("a", False, 0.5)], 2)


# ------------------------------------------------------------------ verifier metrics

def test_auc_matches_pair_counting():
    rng = np.random.default_rng(9)
    for _ in range(20):
        n = int(rng.integers(2, 15))
        scores = list(rng.integers(0, 5, n) / 4)  # many ties
        labels = list(rng.random(n) < 0.5)
        expected = brute_auc(scores, labels)
        got = auc(scores, labels)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got == pytest.approx(expected, abs=1e-12)
    assert auc([0.1, 0.2], [True, True]) is None
    assert auc([0.1, 0.9], [False, True]) == 1.0
    assert auc([0.1, 0.9], [True, False]) == 0.0


def test_within_prompt_vs_pooled_difficulty_only_verifier():
    # the verifier only knows which problem is easy: constant score within a problem
    easy = [Sample("a", True, 0.9)] * 3 + [Sample("b", False, 0.9)]
    hard = [Sample("a", True, 0.1)] + [Sample("b", False, 0.1)] * 3
    assert within_prompt_auc([easy, hard]) == 0.5
    assert pooled_auc([easy, hard]) == pytest.approx(0.75)
    # problems with one class are skipped, not counted as 0.5
    all_right = [Sample("a", True, 0.2)] * 4
    good = [Sample("a", True, 0.8), Sample("b", False, 0.3)]
    assert within_prompt_auc([all_right, good]) == 1.0
    assert within_prompt_auc([all_right]) is None


def test_verifier_accuracy_and_ece():
    probs = [[Sample("a", True, 0.95), Sample("b", False, 0.5)], [Sample(None, True, 0.05), Sample("c", True, 0.15)]]
    # labels T, F, F (invalid), T; predictions (>= 0.5) Y, Y, N, N
    assert verifier_accuracy(probs) == 0.5
    assert verifier_accuracy(probs, threshold=0.1) == 0.75
    # bins: 0.95 -> 9, 0.5 -> 5, 0.05 and 0.15 -> 0 and 1
    assert calibration_error(probs) == pytest.approx((0.05 + 0.5 + 0.05 + 0.85) / 4)
    # a shared bin averages before taking the gap
    assert calibration_error([[Sample("a", True, 0.6), Sample("b", False, 0.6)]], bins=2) == pytest.approx(0.1)
    assert calibration_error([[Sample("a", True, 1.0)]]) == 0.0  # score 1.0 is in the last bin


# ------------------------------------------------------------------ evaluate

def hand_pool():
    p1 = [Sample("a", True, 0.9, -0.1), Sample("a", True, 0.6, -0.2),
          Sample("b", False, 0.3, -0.05), Sample(None, False, 0.8, -1.0)]
    p2 = [Sample("c", False, 0.2, -0.3), Sample("c", False, 0.4, -0.3),
          Sample("d", True, 0.7, -0.3), Sample("d", True, 0.1, -0.3)]
    return [p1, p2]


def test_evaluate_hand_computed():
    out = evaluate(hand_pool(), [1, 2, 4], subsets=20000, seed=0)
    expected_exact = {
        # both problems have c=2 of n=4
        "pass@1": 0.5, "pass@2": 5 / 6, "pass@4": 1.0,
        # k=N uses the whole pool: p1 a:2 vs b:1 -> 1; p2 c:2 vs d:2 tie -> 0.5
        "majority@4": 0.75,
        # p1 a 1.5 vs b 0.3 -> 1; p2 d 0.8 vs c 0.6 -> 1
        "weighted@4": 1.0,
        # best-of weights for N=4: k=2 -> [3, 2, 1, 0]/6; the invalid sample scores 0
        # p1 ranks T T F F(inv); p2 ranks 0.7 T, 0.4 F, 0.2 F, 0.1 T
        "best_of@1": 0.5, "best_of@2": (5 / 6 + 3 / 6) / 2, "best_of@4": 1.0,
        # likelihood: p1 a e^-.1 + e^-.2 > b e^-.05 -> 1; p2 all equal -> tie 0.5
        "weighted_likelihood@4": 0.75,
        # p1 ranks by logprob b(F), a(T), a(T), invalid(F); p2 all tied -> 0.5 at every k
        "best_of_likelihood@1": 0.5, "best_of_likelihood@2": (3 / 6 + 0.5) / 2, "best_of_likelihood@4": 0.25,
        # p1 scores (.9 T, .6 T, .3 F, .8 F) -> 3/4; p2 (.2 F, .4 F, .7 T, .1 T) -> 2/4
        "verifier_auc_within_prompt": 0.625, "verifier_auc_pooled": 10 / 16,
        "verifier_accuracy": 6 / 8,
        "verifier_ece": (0.1 + 0.4 + 0.3 + 0.8 + 0.2 + 0.4 + 0.3 + 0.9) / 8,
        "num_problems": 2,
    }
    # the votes at k < N, enumerated by hand over the 6 pairs / 4 singles
    expected_votes = {
        "majority@1": 0.5, "weighted@1": 0.5, "weighted_likelihood@1": 0.5,
        "majority@2": (4 / 6 + 3 / 6) / 2,  # p1: aa 1, ab .5 x2, a-inv 1 x2, b-inv 0; p2: cc 0, cd .5 x4, dd 1
        "weighted@2": (5 / 6 + 3 / 6) / 2,  # p1: only b-inv fails; p2: d(0.7) wins 2 of cd, d(0.1) loses both
        "weighted_likelihood@2": (3 / 6 + 3 / 6) / 2,  # p1: b (e^-.05) beats each single a; p2 as majority
    }
    assert set(out) == set(expected_exact) | set(expected_votes)  # all exact: no _stderr keys
    for key, val in {**expected_exact, **expected_votes}.items():
        assert out[key] == pytest.approx(val, abs=1e-12), key
    # beyond max_exact, weighted votes are sampled and come with their standard error
    sampled = evaluate(hand_pool(), [1, 2, 4], subsets=4000, seed=0, max_exact=0)
    assert sampled == evaluate(hand_pool(), [1, 2, 4], subsets=4000, seed=0, max_exact=0)  # deterministic
    for key in ("weighted@2", "weighted_likelihood@2"):
        se = sampled[f"{key}_stderr"]
        assert 0 < se < 0.01 and abs(sampled[key] - expected_votes[key]) < 4 * se, key
    assert sampled["weighted@4_stderr"] == 0.0  # k = N: every random subset is the whole pool
    assert sampled["majority@2"] == out["majority@2"]  # majority is counted, never sampled


def test_evaluate_without_logprobs_and_undefined_auc():
    probs = [[Sample("a", True, 0.7), Sample("a", True, 0.3)], [Sample("b", False, 0.4), Sample(None, False, 0.1)]]
    out = evaluate(probs, [1, 2])
    assert not any("likelihood" in key for key in out)
    assert math.isnan(out["verifier_auc_within_prompt"])
    assert out["verifier_auc_pooled"] == 0.75  # pos .7, .3 vs neg .4, .1: 3 of 4 pairs
    assert out["majority@2"] == 0.5 and out["weighted@2"] == 0.5 and out["pass@2"] == 0.5


def test_evaluate_rejects_bad_k_and_ragged_pools():
    with pytest.raises(ValueError, match=r"k=8.*N=4"):
        evaluate(hand_pool(), [1, 8])
    with pytest.raises(ValueError, match="same pool size"):
        evaluate([hand_pool()[0], hand_pool()[1][:3]], [1])
    with pytest.raises(ValueError):
        evaluate([], [1])


def test_evaluate_matches_per_problem_exact_on_random_pools():
    rng = np.random.default_rng(12)
    probs = [random_pool(rng, 6, alphabet=3) for _ in range(5)]
    out = evaluate(probs, [1, 3, 6], seed=1)
    for k in (1, 3, 6):
        assert out[f"majority@{k}"] == pytest.approx(np.mean([float(brute_vote(p, k, False)) for p in probs]),
                                                     abs=1e-12)
        assert out[f"weighted@{k}"] == pytest.approx(np.mean([float(brute_vote(p, k, True)) for p in probs]),
                                                     abs=1e-12)
        eff = [([s.score if s.answer is not None else 0.0 for s in p], [s.correct and s.answer is not None for s in p])
               for p in probs]
        assert out[f"best_of@{k}"] == pytest.approx(np.mean([best_of_k(s, c, k) for s, c in eff]), abs=1e-12)


def test_powers_of_two_up_to():
    assert powers_of_two_up_to(0) == []
    assert powers_of_two_up_to(1) == [1]
    assert powers_of_two_up_to(16) == [1, 2, 4, 8, 16]
    assert powers_of_two_up_to(100) == [1, 2, 4, 8, 16, 32, 64]


def test_step_verifier_quality_is_the_pool_metrics():
    """The training step's verifier metrics are the evaluation's, on the step's rollouts as one pool."""
    from rlv_megatron.eval.scaling import verifier_quality

    rng = np.random.default_rng(13)
    scores, correct, groups = list(rng.random(24)), list(rng.random(24) < 0.4), [i // 6 for i in range(24)]
    problems = [[Sample("x" if c else "y", bool(c), s) for s, c, g in zip(scores, correct, groups) if g == q]
                for q in range(4)]
    got = verifier_quality(scores, correct, groups)
    assert got["verifier/auc_pooled"] == pytest.approx(pooled_auc(problems), abs=1e-12)
    assert got["verifier/auc_within_prompt"] == pytest.approx(within_prompt_auc(problems), abs=1e-12)
    assert got["verifier/accuracy"] == pytest.approx(verifier_accuracy(problems), abs=1e-12)
