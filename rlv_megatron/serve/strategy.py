"""Test-time strategies of one request: which of its samples answers, and how sure the model is.

Samples are grouped by answer with the same equivalence as evaluation (eval/equivalence.py keys); a sample
without an answer never votes. An answer's weight is
    single    the first sample alone              confidence: its P("Yes")
    majority  the number of its samples           confidence: its share of the voting samples
    weighted  the sum of its samples' P("Yes")    confidence: its share of the total weight
    best_of   its samples' highest P("Yes")       confidence: that P("Yes")
The reply is the winning answer's highest-scoring sample (ties: the earlier sample). Adaptive sampling
(serve/worker.py) stops once the confidence reaches serve.min_confidence.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Candidate:
    text: str
    answer: str | None  # as the task's extractor found it (None: no answer)
    key: str | None  # its equivalence class
    score: float  # the verifier's P("Yes")
    tokens: int


@dataclass
class Decision:
    index: int  # the sample that answers
    answer: str | None
    confidence: float
    answers: list[dict]  # per distinct answer, the winner first: answer, samples, weight, best_score


def _weight(strategy: str, scores: list[float]) -> float:
    if strategy == "majority":
        return float(len(scores))
    if strategy == "weighted":
        return float(sum(scores))
    if strategy == "best_of":
        return max(scores)
    raise ValueError(f"unknown strategy {strategy!r}")


def decide(samples: list[Candidate], strategy: str) -> Decision:
    if not samples:
        raise ValueError("no samples to decide between")
    if strategy == "single":
        first = samples[0]
        return Decision(0, first.answer, first.score, [] if first.key is None else [
            {"answer": first.answer, "samples": 1, "weight": first.score, "best_score": first.score}])
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.key is not None:
            groups.setdefault(s.key, []).append(i)
    if not groups:  # nothing to vote on: the verifier's favourite sample, with no confidence in an answer
        best = max(range(len(samples)), key=lambda i: (samples[i].score, -i))
        return Decision(best, None, 0.0, [])
    rows = []
    for members in groups.values():
        scores = [samples[i].score for i in members]
        top = max(members, key=lambda i: (samples[i].score, -i))
        rows.append({"answer": samples[members[0]].answer, "samples": len(members),
                     "weight": _weight(strategy, scores), "best_score": samples[top].score, "_top": top,
                     "_first": members[0]})
    rows.sort(key=lambda r: (-r["weight"], -r["best_score"], r["_first"]))
    win = rows[0]
    if strategy == "best_of":
        confidence = win["weight"]
    else:
        total = sum(r["weight"] for r in rows)
        confidence = win["weight"] / total if total > 0 else 0.0
    return Decision(win["_top"], win["answer"], confidence,
                    [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
