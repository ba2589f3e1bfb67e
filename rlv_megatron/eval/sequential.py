"""Sequential scaling: the best strategy per length budget, and adaptive length by verifier confidence.

Adaptive length (docs/rlv-method.md): per problem, raise the budget until the verifier's confidence in the
winning answer of the weighted vote over all N samples reaches tau, or the budgets run out. Confidence =
mean P(Yes) of the samples that vote for the winner (for the tied winners together, on a tie). Samples are
extended, not drawn again, when the budget rises, so a problem's tokens are its N samples' lengths at the
budget where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlv_megatron.eval import scaling

STRATEGIES = ("majority", "weighted", "best_of", "weighted_likelihood", "best_of_likelihood")


def best_strategy(metrics: dict, k: int) -> dict:
    """The strategy with the highest accuracy at k (the first in STRATEGIES on a tie)."""
    have = [(metrics[f"{s}@{k}"], -i, s) for i, s in enumerate(STRATEGIES) if f"{s}@{k}" in metrics]
    if not have:
        raise ValueError(f"no strategy measured at k={k}")
    acc, _, name = max(have)
    return {"strategy": name, "accuracy": acc, "k": k}


def vote(samples: Sequence[scaling.Sample]) -> tuple[float, float]:
    """Weighted vote over the whole pool: (credit: fraction of the tied winners that are correct, confidence).
    No valid answer: (0, 0)."""
    weight: dict = {}
    for s in samples:
        if s.answer is not None:
            weight[s.answer] = weight.get(s.answer, 0.0) + s.score
    if not weight:
        return 0.0, 0.0
    top = max(weight.values())
    winners = {a for a, w in weight.items() if w >= top - scaling._TIE_RTOL * abs(top)}
    voters = [s for s in samples if s.answer in winners]
    right = {s.answer for s in voters if s.correct}
    return len(right) / len(winners), float(np.mean([s.score for s in voters]))


def adaptive(pools: dict[int, list[list[scaling.Sample]]], lengths: dict[int, list[list[int]]],
             taus: Sequence[float]) -> list[dict]:
    """Per tau: accuracy, mean tokens per problem and mean stopping budget (budgets = the pools' keys)."""
    budgets = sorted(pools)
    votes = np.array([[vote(p) for p in pools[b]] for b in budgets])  # [B, P, (credit, confidence)]
    tokens = np.array([[sum(n) for n in lengths[b]] for b in budgets], dtype=np.float64)  # [B, P]
    out = []
    for tau in taus:
        reached = votes[:, :, 1] >= tau
        stop = np.where(reached.any(0), reached.argmax(0), len(budgets) - 1)  # first budget that reaches tau
        cols = np.arange(stop.size)
        out.append({"tau": float(tau), "accuracy": float(votes[stop, cols, 0].mean()),
                    "tokens": float(tokens[stop, cols].mean()),
                    "mean_budget": float(np.mean(np.array(budgets)[stop]))})
    return out
