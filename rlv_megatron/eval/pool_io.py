"""Pool files: one JSON line per sample (problem_id, sample, answer, correct, score, length, ...); parquet
with the same columns reads too."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlv_megatron.atomic import atomic_open
from rlv_megatron.tasks.math_data import DataError, iter_rows

# field -> accepted types; answer None = no answer extracted (an invalid sample)
REQUIRED = {"problem_id": (str, int), "answer": (str, type(None)), "correct": (bool,), "score": (int, float),
            "length": (int,)}
OPTIONAL = {"logprob_mean": (int, float), "max_tokens": (int,), "task": (str,), "sample": (str,)}


class PoolError(DataError):
    """A pool file that cannot be used; the message names the file and line."""


def write_pool(path: str | Path, pools: dict[int, list[list[dict]]]) -> Path:
    """All budgets' rows into one jsonl, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        for pool in pools.values():
            for rows in pool:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    return path


def _number(v) -> float:
    try:
        return float(v)
    except OverflowError:  # an int too large for a float
        return math.inf


def _check(row: dict, path: Path, lineno: int, kind: str = "probability") -> dict:
    for name in REQUIRED:
        if name not in row:
            raise PoolError(f"{path}:{lineno}: missing field {name!r} (a pool row needs {', '.join(REQUIRED)})")
    for name, types in {**REQUIRED, **OPTIONAL}.items():
        v = row.get(name)
        wrong = not isinstance(v, types) or (isinstance(v, bool) and bool not in types)  # bool is an int
        if wrong and (name in REQUIRED or v is not None):  # an optional field may be null (parquet)
            expected = " or ".join(t.__name__ for t in types)
            raise PoolError(f"{path}:{lineno}: field {name!r} is {v!r}, expected {expected}")
    for name in ("score", "logprob_mean"):
        if row.get(name) is not None and not math.isfinite(_number(row[name])):
            raise PoolError(f"{path}:{lineno}: field {name!r} is {row[name]!r}, expected a finite number")
    if kind == "probability" and not 0.0 <= row["score"] <= 1.0:
        raise PoolError(f"{path}:{lineno}: field 'score' is {row['score']!r}, outside [0, 1] for "
                        "eval.score_kind=probability (declare eval.score_kind=logit or reward for unbounded "
                        "scores)")
    if row["length"] < 0:
        raise PoolError(f"{path}:{lineno}: field 'length' is {row['length']!r}, expected >= 0")
    return row


def read_pool(path: str | Path, kind: str = "probability") -> dict[int | None, list[list[dict]]]:
    """Rows grouped by budget (`max_tokens`, None when absent) and problem, in file order; every problem of
    a budget must have the same number of samples N. `kind` (eval.score_kind): what `score` is; any finite
    number for "logit" and "reward", in [0, 1] for "probability"."""
    path = Path(path)
    pools: dict = {}
    first_line: dict = {}
    for lineno, row in iter_rows(path):  # DataError names file:line for unreadable lines
        row = _check(row, path, lineno, kind)
        budget = row.get("max_tokens")
        pools.setdefault(budget, {}).setdefault(str(row["problem_id"]), []).append(row)
        first_line.setdefault((budget, str(row["problem_id"])), lineno)
    if not pools:
        raise PoolError(f"{path}: no samples")
    out = {}
    for budget, by_problem in sorted(pools.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        sizes = {pid: len(rows) for pid, rows in by_problem.items()}
        n = max(sizes.values())
        short = [pid for pid, size in sizes.items() if size != n]
        if short:
            raise PoolError(f"{path}:{first_line[(budget, short[0])]}: problem {short[0]!r} has {sizes[short[0]]} "
                            f"samples, others {n} (max_tokens={budget}): every problem needs the same N")
        out[budget] = list(by_problem.values())
    return out
