"""Test-time scaling metrics over a pool of N samples per problem (docs/rlv-method.md, "Test-time scaling").

Conventions (the choices the doc leaves open):
- A sample whose `answer` is None is invalid: it never votes, counts as wrong, and for best-of selection its
  score is 0 (likelihood baseline: -inf), as in the authors' code.
- Samples with equal `answer` keys are one vote and must share `correct`; a mismatch raises ValueError,
  since it means the grader is inconsistent and every vote metric would be ill-defined.
- Ties (in votes, vote weights, or best-of scores) get "fraction of credit": if t candidates tie, the credit
  is the fraction of them that are correct, i.e. the expectation under uniformly random tie-breaking.
  Weighted sums count as tied within a relative 1e-9 (float sums of equal totals may differ in the last bit).
- Likelihood baselines: weighted_likelihood votes with weight exp(logprob_mean) (the per-token geometric-mean
  probability of the sample); best_of_likelihood ranks by logprob_mean.
- Verifier metrics (AUC, accuracy, ECE) use the `score` of every sample, invalid ones included, with
  label `correct and answer is not None`: they judge the verifier on everything it was asked about.
- Score kinds (docs/eval-scores.md): "probability" (in [0, 1]), "logit" (any finite real; sigmoid gives the
  probability) or "reward" (any finite real). Votes weigh p, sigmoid(z) or exp((r - max r) / T) (softmax
  weights up to a constant; max over the problem's valid samples); best-of and AUC rank the raw score; accuracy and
  ECE use the probability and are None for rewards. An invalid sample's best-of score is the lowest there is:
  0 for probabilities, -inf otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

_TIE_RTOL = 1e-9
_CHUNK_ELEMS = 1 << 22  # problems are processed in chunks of about this many subset x sample cells


@dataclass(frozen=True)
class Sample:
    answer: Hashable | None  # canonical answer key; None = no answer extracted (invalid)
    correct: bool
    score: float  # verifier P("Yes") in [0, 1], or a logit or raw reward (the `kind` of evaluate)
    logprob_mean: float | None = None  # mean token log-prob, for the likelihood baselines


SCORE_KINDS = ("probability", "logit", "reward")


def sigmoid(z) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))  # no overflow either side


def _check_kind(kind: str, temperature: float) -> None:
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind {kind!r}: must be one of {SCORE_KINDS}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"reward temperature {temperature!r}: must be a finite number > 0")


def powers_of_two_up_to(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length())] if n >= 1 else []


# ---------------------------------------------------------------------------------------------- pass@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as a product so no huge binomials appear."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------- best-of-k

@functools.lru_cache(maxsize=256)
def _top_weights(n: int, k: int) -> np.ndarray:
    """P(rank i is the top of a uniformly random k-subset) = C(n-i-1, k-1) / C(n, k)."""
    total = math.comb(n, k)
    w = np.array([math.comb(n - i - 1, k - 1) / total for i in range(n)])  # exact big-int division
    w.flags.writeable = False
    return w


def _tie_averaged(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Correctness by descending-score rank, averaged within each group of equal scores.

    Random tie-breaking puts each tied sample at each tied rank equally often, so averaging the
    correctness over the group gives the expectation of the analytic formula.
    """
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-scores, kind="stable")
    _, inv, cnt = np.unique(scores[order], return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=correct[order].astype(np.float64)) / cnt)[inv]


def best_of_k(scores: Sequence[float], correct: Sequence[bool], k: int) -> float:
    """Expected correctness of the top-scored sample of a uniformly random k-subset (ties: fraction of credit)."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    if s.shape != c.shape or s.ndim != 1:
        raise ValueError("scores and correct must be 1-D and of equal length")
    _check_k(k, s.size)
    return float(_tie_averaged(s, c) @ _top_weights(s.size, k))


# ---------------------------------------------------------------------------------------------- voting

def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range for a pool of N={n} samples (need 1 <= k <= N)")


def _encode(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Answer codes per sample (-1 = invalid) and correctness per distinct answer."""
    codes = np.full(len(samples), -1, dtype=np.int64)
    index: dict = {}
    answer_correct: list[bool] = []
    for i, s in enumerate(samples):
        if s.answer is None:
            continue
        d = index.setdefault(s.answer, len(index))
        if d == len(answer_correct):
            answer_correct.append(bool(s.correct))
        elif answer_correct[d] != bool(s.correct):
            raise ValueError(f"answer {s.answer!r} is marked both correct and wrong")
        codes[i] = d
    return codes, np.array(answer_correct, dtype=bool)


def _weights(samples: Sequence[Sample], key: str, kind: str = "probability", temperature: float = 1.0) -> np.ndarray:
    if key == "score":
        w = np.array([s.score for s in samples], dtype=np.float64)
        if kind == "logit":
            w = sigmoid(w)
        elif kind == "reward":  # softmax weights; shifting by a constant changes no vote
            valid = [s.answer is not None for s in samples]
            top = w[valid].max() if any(valid) else 0.0
            w = np.exp((w - top) / temperature)
    elif key == "likelihood":
        if any(s.logprob_mean is None for s in samples):
            raise ValueError("key='likelihood' needs logprob_mean on every sample")
        w = np.exp(np.array([s.logprob_mean for s in samples], dtype=np.float64))
    else:
        raise ValueError(f"unknown weight key {key!r} (use 'score' or 'likelihood')")
    if not (w >= 0).all():  # also catches NaN
        raise ValueError("vote weights must be non-negative numbers")
    return w


def _credit(votes: np.ndarray, present: np.ndarray, answer_correct: np.ndarray) -> np.ndarray:
    """Fraction-of-credit correctness of the argmax answer; votes/present [P, S, D], answer_correct [P, D]."""
    top = np.where(present, votes, -np.inf).max(-1, keepdims=True)
    tied = present & (votes >= top - _TIE_RTOL * np.abs(top))
    n_tied = tied.sum(-1)
    n_right = (tied & answer_correct[:, None, :]).sum(-1)
    return np.where(n_tied > 0, n_right / np.maximum(n_tied, 1), 0.0)  # no valid answer: 0


@functools.lru_cache(maxsize=1 << 16)
def _majority_counted(mine: int, others: tuple[int, ...], invalid: int, k: int) -> float:
    """Sum over the k-subsets of an answer drawn `mine` times in the pool (beside answers drawn `others`
    times and `invalid` samples that never vote) of its share of the majority: it wins a subset where it is
    drawn x >= 1 times and every other answer at most x times, 1/(t + 1) of it when t others tie at x."""
    total = 0.0
    for x in range(1, min(mine, k) + 1):
        rest = k - x
        # ways[j][t]: j samples from the invalid ones and the others so far, t of those answers drawn x times
        ways = np.zeros((rest + 1, len(others) + 1))
        ways[:, 0] = [math.comb(invalid, j) for j in range(rest + 1)]
        for m in others:
            new = np.zeros_like(ways)
            for y in range(min(m, x, rest) + 1):
                c = float(math.comb(m, y))
                if y == x:
                    new[y:, 1:] += c * ways[:rest + 1 - y, :-1]
                else:
                    new[y:] += c * ways[:rest + 1 - y]
            ways = new
        total += math.comb(mine, x) * float(ways[rest] @ (1.0 / np.arange(1, len(others) + 2)))
    return total


def _majority_exact(codes: np.ndarray, answer_correct: np.ndarray, k: int) -> float:
    """majority@k over all C(N, k) subsets, by counting (any N): the summed win shares of the correct answers."""
    counts = np.bincount(codes[codes >= 0], minlength=answer_correct.size)
    invalid = len(codes) - int(counts.sum())
    wins = sum(_majority_counted(int(counts[a]), tuple(sorted(int(c) for c in np.delete(counts, a))), invalid, k)
               for a in np.flatnonzero(answer_correct))
    return wins / math.comb(len(codes), k)


def _weighted_credit(codes: np.ndarray, answer_correct: np.ndarray, weights: Sequence[np.ndarray],
                     subsets: np.ndarray, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted-vote credit over subsets, for every k in ks: its mean and the mean of its square per problem.

    codes [P, N]; answer_correct [P, D] (padded with False); weights: list of [P, N];
    subsets [P or 1, S, >=max(ks)] sample indices whose first k columns form each size-k subset.
    Returns two [len(weights), len(ks), P] arrays. Votes for k are accumulated from those for the previous
    k, so all ks cost one pass.
    """
    p, s = codes.shape[0], subsets.shape[1]
    subsets = np.broadcast_to(subsets, (p, *subsets.shape[1:]))
    d = max(answer_correct.shape[1], 1)
    cell = (np.arange(p)[:, None, None] * s + np.arange(s)[None, :, None]) * d  # flat [P, S] offsets
    pi = np.arange(p)[:, None, None]
    counts = np.zeros(p * s * d)
    sums = np.zeros((len(weights), p * s * d))
    mean = np.empty((len(weights), len(ks), p))
    square = np.empty((len(weights), len(ks), p))
    prev = 0
    for j in sorted(range(len(ks)), key=lambda j: ks[j]):
        block = subsets[:, :, prev:ks[j]]
        prev = ks[j]
        c = codes[pi, block]
        valid = c >= 0
        flat = (cell + c)[valid]
        counts += np.bincount(flat, minlength=p * s * d)
        present = counts.reshape(p, s, d) > 0
        for w, wt in enumerate(weights):
            sums[w] += np.bincount(flat, weights=wt[pi, block][valid], minlength=p * s * d)
            credit = _credit(sums[w].reshape(p, s, d), present, answer_correct)
            mean[w, j], square[w, j] = credit.mean(-1), (credit ** 2).mean(-1)
    return mean, square


def _random_subsets(rng: np.random.Generator, p: int, subsets: int, n: int) -> np.ndarray:
    # argsort of i.i.d. keys = a uniform permutation per row; its first k entries are a uniform k-subset.
    return rng.random((p, subsets, n)).argsort(-1)


@functools.lru_cache(maxsize=64)
def _all_subsets(n: int, k: int) -> np.ndarray:
    _check_k(k, n)
    out = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(1, -1, k)
    out.flags.writeable = False
    return out


def majority_at_k(samples: Sequence[Sample], k: int) -> float:
    """Whether the most common valid answer of a k-subset is correct, over all C(N, k) subsets (exact)."""
    _check_k(k, len(samples))
    return _majority_exact(*_encode(samples), k)


def weighted_at_k(samples: Sequence[Sample], k: int, key: str = "score", kind: str = "probability",
                  temperature: float = 1.0, max_exact: int = 20_000, subsets: int = 1_000,
                  rng: np.random.Generator | int | None = None) -> float:
    """Like majority_at_k, but each answer's vote is the sum of its weights (score, or exp(logprob_mean)):
    exact over all C(N, k) subsets up to `max_exact` of them, else the mean over `subsets` random ones."""
    _check_k(k, len(samples))
    _check_kind(kind, temperature)
    codes, answer_correct = _encode(samples)
    exact = math.comb(len(samples), k) <= max_exact
    idx = _all_subsets(len(samples), k) if exact else \
        _random_subsets(np.random.default_rng(rng), 1, subsets, len(samples))
    mean, _ = _weighted_credit(codes[None], answer_correct[None], [_weights(samples, key, kind, temperature)[None]],
                               idx, [k])
    return float(mean[0, 0, 0])


# ---------------------------------------------------------------------------------------------- verifier

def _labels(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([bool(s.correct) and s.answer is not None for s in samples], dtype=bool)


def _raw_scores(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([s.score for s in samples], dtype=np.float64)


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC via Mann-Whitney U (ties count 0.5); None when only one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of equal length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(cnt) - (cnt - 1) / 2.0)[inv]  # 1-based average ranks
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def within_prompt_auc(problems: Sequence[Sequence[Sample]]) -> float | None:
    """Mean per-problem AUC over problems that have both correct and wrong samples (None if there are none)."""
    vals = [a for p in problems if (a := auc(_raw_scores(p), _labels(p))) is not None]
    return float(np.mean(vals)) if vals else None


def pooled_auc(problems: Sequence[Sequence[Sample]]) -> float | None:
    """AUC over all samples of all problems; rewards a verifier that only predicts problem difficulty."""
    flat = [s for p in problems for s in p]
    return auc(_raw_scores(flat), _labels(flat))


def _pooled(problems: Sequence[Sequence[Sample]]) -> tuple[np.ndarray, np.ndarray]:
    flat = [s for p in problems for s in p]
    if not flat:
        raise ValueError("no samples")
    return _raw_scores(flat), _labels(flat)


def verifier_quality(scores: Sequence[float], correct: Sequence[bool], group_ids: Sequence[int]) -> dict:
    """A training step's verifier on its rollouts: accuracy at 0.5, pooled AUC, and AUC within a prompt
    (mean over prompts with both classes), as step metrics."""
    groups: dict = {}
    for s, c, g in zip(scores, correct, group_ids):
        groups.setdefault(g, ([], []))
        groups[g][0].append(s)
        groups[g][1].append(c)
    within = [a for s, c in groups.values() if (a := auc(s, c)) is not None]
    return {"verifier/accuracy": sum((s >= 0.5) == c for s, c in zip(scores, correct)) / max(len(scores), 1),
            "verifier/auc_pooled": auc(scores, correct),
            "verifier/auc_within_prompt": float(np.mean(within)) if within else None}


def verifier_accuracy(problems: Sequence[Sequence[Sample]], threshold: float = 0.5) -> float:
    """Fraction of samples where (score >= threshold) matches correctness, pooled over samples."""
    s, y = _pooled(problems)
    return float(np.mean((s >= threshold) == y))


def calibration_error(problems: Sequence[Sequence[Sample]], bins: int = 10) -> float:
    """Expected calibration error: equal-width bins on [0, 1], sum_b n_b/n * |mean(correct) - mean(score)|."""
    s, y = _pooled(problems)
    b = np.clip(np.floor(s * bins).astype(np.int64), 0, bins - 1)  # score 1.0 goes in the last bin
    gap = np.bincount(b, weights=y.astype(np.float64), minlength=bins) - np.bincount(b, weights=s, minlength=bins)
    return float(np.abs(gap).sum() / s.size)


# ---------------------------------------------------------------------------------------------- evaluate

def as_probabilities(problems: Sequence[Sequence[Sample]], kind: str) -> list[list[Sample]] | None:
    """The problems with scores as probabilities: as they are, sigmoid of logits; None for raw rewards."""
    if kind == "reward":
        return None
    if kind == "probability":
        return [list(p) for p in problems]
    return [[dataclasses.replace(s, score=float(sigmoid(s.score))) for s in p] for p in problems]


def evaluate(problems: Sequence[Sequence[Sample]], ks: Sequence[int], subsets: int = 100,
             seed: int = 0, kind: str = "probability", temperature: float = 1.0,
             max_exact: int = 20_000) -> dict[str, float | None]:
    """All scaling metrics, each a mean over problems; every problem must have the same pool size N.

    Keys: pass@k, majority@k, weighted@k, best_of@k for each k; weighted_likelihood@k and
    best_of_likelihood@k when every sample has logprob_mean; verifier_auc_within_prompt,
    verifier_auc_pooled (NaN when undefined), verifier_accuracy, verifier_ece (None for kind "reward"),
    num_problems. pass@k, best_of@k and majority@k are exact; weighted@k too where C(N, k) <= max_exact,
    else a Monte Carlo mean over `subsets` random k-subsets, with `weighted@k_stderr` (and
    `weighted_likelihood@k_stderr`) in the output.
    `kind`: what `score` is (SCORE_KINDS); `temperature`: T of the reward softmax.
    """
    if not problems:
        raise ValueError("no problems")
    _check_kind(kind, temperature)
    ks = [int(k) for k in ks]
    n = len(problems[0])
    if any(len(p) != n for p in problems):
        raise ValueError(f"all problems need the same pool size N, got {sorted({len(p) for p in problems})}")
    for k in ks:
        _check_k(k, n)
    likelihood = all(s.logprob_mean is not None for p in problems for s in p)
    keys = ["score", "likelihood"] if likelihood else ["score"]

    # pass@k and best-of@k are analytic: mean over problems first, then one dot product per k.
    num_correct = [int(_labels(p).sum()) for p in problems]
    rank_correct = {key: np.zeros(n) for key in keys}
    for p in problems:
        valid = np.array([s.answer is not None for s in p])
        labels = _labels(p)
        lowest = 0.0 if kind == "probability" else -np.inf
        rank_correct["score"] += _tie_averaged(np.where(valid, _raw_scores(p), lowest), labels)
        if likelihood:
            lp = np.array([s.logprob_mean for s in p], dtype=np.float64)
            rank_correct["likelihood"] += _tie_averaged(np.where(valid, lp, -np.inf), labels)

    # Votes. majority@k: exact, by counting. weighted@k: exact over all C(N, k) subsets where there are at
    # most `max_exact`, else the mean over `subsets` random ones (drawn from one generator in problem order,
    # the same for every such k), reported with its standard error.
    encoded = [_encode(p) for p in problems]
    weights_of = [[_weights(p, key, kind, temperature) for p in problems] for key in keys]
    majority = [float(np.mean([_majority_exact(c, ac, k) for c, ac in encoded])) for k in ks]
    weighted = np.zeros((len(keys), len(ks)))
    stderr = {}
    exact = [j for j, k in enumerate(ks) if math.comb(n, k) <= max_exact]
    sampled = [j for j in range(len(ks)) if j not in exact]
    rng = np.random.default_rng(seed)
    for js, count in [([j], math.comb(n, ks[j])) for j in exact] + ([(sampled, subsets)] if sampled else []):
        variance = np.zeros((len(keys), len(js)))
        chunk = max(1, _CHUNK_ELEMS // (count * n))
        for start in range(0, len(problems), chunk):
            part = slice(start, start + chunk)
            d = max(1, max(ac.size for _, ac in encoded[part]))
            codes = np.stack([c for c, _ in encoded[part]])
            answer_correct = np.zeros((len(codes), d), dtype=bool)
            for i, (_, ac) in enumerate(encoded[part]):
                answer_correct[i, :ac.size] = ac
            idx = _all_subsets(n, ks[js[0]]) if js[0] in exact else _random_subsets(rng, len(codes), subsets, n)
            mean, square = _weighted_credit(codes, answer_correct, [np.stack(w[part]) for w in weights_of], idx,
                                            [ks[j] for j in js])
            weighted[:, js] += mean.sum(-1)
            variance += (square - mean ** 2).sum(-1) * count / max(count - 1, 1)  # per problem, unbiased
        if js[0] not in exact:
            for w, key in enumerate(["weighted", "weighted_likelihood"][:len(keys)]):
                for jj, j in enumerate(js):
                    stderr[f"{key}@{ks[j]}_stderr"] = float(math.sqrt(variance[w, jj] / count) / len(problems))

    m = len(problems)
    out: dict[str, float | None] = {}
    for j, k in enumerate(ks):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in num_correct]))
        out[f"majority@{k}"] = majority[j]
        out[f"weighted@{k}"] = float(weighted[0, j] / m)
        out[f"best_of@{k}"] = float(rank_correct["score"] @ _top_weights(n, k) / m)
        if likelihood:
            out[f"weighted_likelihood@{k}"] = float(weighted[1, j] / m)
            out[f"best_of_likelihood@{k}"] = float(rank_correct["likelihood"] @ _top_weights(n, k) / m)
    within, pooled = within_prompt_auc(problems), pooled_auc(problems)
    out["verifier_auc_within_prompt"] = math.nan if within is None else within
    out["verifier_auc_pooled"] = math.nan if pooled is None else pooled
    probs = as_probabilities(problems, kind)
    out["verifier_accuracy"] = None if probs is None else verifier_accuracy(probs)
    out["verifier_ece"] = None if probs is None else calibration_error(probs)
    out["num_problems"] = m
    out.update(stderr)
    return out
