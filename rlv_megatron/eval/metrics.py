"""Every metric of `rlv eval` from pools of rows (pool_io), per length budget, plus the sequential ones and
the compute-efficiency factor against a baseline pool."""

from __future__ import annotations

import math

import numpy as np

from rlv_megatron.eval import scaling
from rlv_megatron.config import ConfigError, EvalConfig
from rlv_megatron.eval import sequential
from rlv_megatron.eval.equivalence import AnswerKeys
from rlv_megatron.eval.report import by_k


def samples_to_reach(curve: dict[int, float], target: float) -> float | None:
    """Smallest k at which `curve` (accuracy by k) reaches `target`, linear in log2 k between the measured
    ks; None when it never does."""
    ks = sorted(curve)
    if curve[ks[0]] >= target:
        return float(ks[0])
    for lo, hi in zip(ks, ks[1:]):
        a, b = curve[lo], curve[hi]
        if b >= target:
            t = (target - a) / (b - a)  # b > a here: a < target <= b
            return float(2 ** (math.log2(lo) + t * (math.log2(hi) - math.log2(lo))))
    return None


def efficiency(metrics: dict, baseline: dict) -> dict[int, dict]:
    """Per k: how many times more samples the baseline's majority vote needs to reach this weighted@k
    (factor None: not reached within the baseline's pool)."""
    majority = by_k(baseline).get("majority", {})
    out = {}
    for k, acc in sorted(by_k(metrics).get("weighted", {}).items()):
        need = samples_to_reach(majority, acc)
        out[k] = {"weighted": acc, "baseline_samples": need, "factor": None if need is None else need / k}
    return out


def _samples(pool: list[list[dict]], votes: list[list]) -> list[list[scaling.Sample]]:
    likelihood = all(r.get("logprob_mean") is not None for rows in pool for r in rows)
    return [[scaling.Sample(v, r["correct"], float(r["score"]), r["logprob_mean"] if likelihood else None)
             for r, v in zip(rows, vs)] for rows, vs in zip(pool, votes)]


def budget_label(budget: int | None) -> str:
    return "pool" if budget is None else str(budget)


UNDEFINED_FOR_REWARDS = {
    "verifier_accuracy": "needs probabilities (P >= 0.5); a raw reward has no threshold",
    "verifier_ece": "calibration needs probabilities; a raw reward is none",
    "adaptive": "the confidence threshold tau is a probability; a raw reward is none"}


def scores_info(cfg: EvalConfig) -> dict:
    info = {"kind": cfg.score_kind, "doc": "docs/eval-scores.md"}
    if cfg.score_kind == "reward":
        info.update(reward_temperature=cfg.reward_temperature, undefined=UNDEFINED_FOR_REWARDS)
    return info


def pool_metrics(pool: list[list[dict]], cfg: EvalConfig, keys: AnswerKeys, samples: list | None = None) -> dict:
    """The metrics of one pool, for k = powers of two up to N (and eval.strategy_k): every evaluation (during
    a run, a recipe's final one, `rlv eval`) computes them here, answers grouped by `keys`. `samples`, when
    given, receives the pool as scaling.Samples."""
    task = pool[0][0].get("task") or "math"  # the default of `rlv eval`
    votes = keys.vote_keys(task, pool)
    scored = _samples(pool, votes)
    if samples is not None:
        samples[:] = scored
    n = len(pool[0])
    k = cfg.strategy_k or n
    if not 1 <= k <= n:
        raise ConfigError(f"eval.strategy_k={k}: must be between 1 and the pool size N={n}")
    ks = sorted(set(scaling.powers_of_two_up_to(n)) | {k})
    m = scaling.evaluate(scored, ks, subsets=cfg.subsets, seed=cfg.seed, max_exact=cfg.exact_subsets,
                         kind=cfg.score_kind, temperature=cfg.reward_temperature)
    m["samples"] = n
    m["mean_length"] = float(np.mean([r["length"] for rows in pool for r in rows]))
    m["answers_per_problem"] = float(np.mean([len({r["answer"] for r in rows} - {None}) for rows in pool]))
    m["groups_per_problem"] = float(np.mean([len(set(v) - {None}) for v in votes]))
    return m


def pool_report(pools: dict[int | None, list[list[dict]]], cfg: EvalConfig, keys: AnswerKeys,
                baseline: dict[int | None, list[list[dict]]] | None = None) -> dict:
    """{"budgets": {label: metrics}, "best_strategy": {label: ...}, "adaptive": [...] (two budgets or more,
    not for rewards), "efficiency": {label: {k: ...}} (with a baseline, per budget both pools have),
    "scores": the score kind (and what it leaves undefined), "grouping": stats}."""
    report: dict = {"budgets": {}, "best_strategy": {}, "scores": scores_info(cfg)}
    samples, lengths = {}, {}
    for budget, pool in pools.items():
        m = pool_metrics(pool, cfg, keys, samples=samples.setdefault(budget, []))
        lengths[budget] = [[r["length"] for r in rows] for rows in pool]
        report["budgets"][budget_label(budget)] = m
        report["best_strategy"][budget_label(budget)] = sequential.best_strategy(m, cfg.strategy_k or m["samples"])
    numeric = {b: scaling.as_probabilities(s, cfg.score_kind) for b, s in samples.items() if b is not None}
    if len(numeric) >= 2 and cfg.score_kind != "reward":
        report["adaptive"] = sequential.adaptive(numeric, {b: lengths[b] for b in numeric}, cfg.taus)
    if baseline is not None:
        base = pool_report(baseline, cfg, keys)["budgets"]
        common = [b for b in report["budgets"] if b in base]
        if not common:
            raise ValueError(f"the baseline pool has budgets {sorted(base)}, this pool {sorted(report['budgets'])}: "
                             "none in common")
        report["efficiency"] = {b: efficiency(report["budgets"][b], base[b]) for b in common}
        report["baseline"] = base
    report["grouping"] = dict(keys.stats)
    return report
