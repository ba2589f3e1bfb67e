"""Answers grouped by mathematical equivalence: equivalent answers are one vote (docs/rlv-method.md).

Within a problem, every correct answer is equivalent to the gold answer (that is what the grader checked), so
correct answers form one group. Wrong answers are grouped by a canonical key: math-verify's parse, then
numbers by value (12 significant digits: `\\frac12`, `0.5`, `1/2` agree), expressions by their values at
fixed points of their symbols (`(x+1)^2` and `x^2+2x+1` agree), sets, intervals and tuples element-wise,
`x=5` as `5`, `25\\%` as `25` (as the math grader). Keys come from a GraderPool (per-item time limit: sympy
can hang on adversarial answers; a timed-out answer keeps its own string as key), cached by answer string
across problems, budgets and pools. Tasks without a canonicaliser (gsm8k and subset_sum answers are canonical
already) key on the string.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlv_megatron.atomic import atomic_write_text
from rlv_megatron.tasks.graders import GraderPool, register_grader, strip_percent

_POINTS = (0.5772156649, 1.2599210499, 2.7182818285, 0.3183098862, 1.6180339887)  # one per free symbol


def _num(z: complex) -> str:
    parts = [format(x, ".12g") for x in (z.real, z.imag)]
    parts = ["0" if p == "-0" else p for p in parts]
    return parts[0] if parts[1] == "0" else f"{parts[0]}{'' if parts[1].startswith('-') else '+'}{parts[1]}j"


def _key(e) -> str:
    import sympy

    if isinstance(e, (sympy.FiniteSet, set, frozenset)):
        return "{" + ",".join(sorted({_key(x) for x in e})) + "}"
    if isinstance(e, (sympy.Tuple, tuple, list)):
        return "(" + ",".join(_key(x) for x in e) + ")"
    if isinstance(e, sympy.Interval):
        return f"{'(' if e.left_open else '['}{_key(e.start)},{_key(e.end)}{')' if e.right_open else ']'}"
    if isinstance(e, sympy.Eq) and isinstance(e.lhs, sympy.Symbol):
        return _key(e.rhs)
    if isinstance(e, sympy.Expr):
        symbols = sorted(e.free_symbols, key=str)
        if len(symbols) <= len(_POINTS):
            try:
                exact = e.subs(dict(zip(symbols, _POINTS))).evalf(30)
                value = complex(exact)
                # NaN, infinities and underflow (x^{10^6} -> 0) are no value: key on the structure
                if value == value and abs(value) != float("inf") and (value != 0 or exact == 0):
                    return ",".join(map(str, symbols)) + ":" + _num(value) if symbols else _num(value)
            except (TypeError, ValueError, OverflowError, ZeroDivisionError, AttributeError):
                pass
    return "expr:" + sympy.srepr(e)


@register_grader("math_key")
def math_key(answer: str, _unused: str = "") -> str:
    """The canonical key of a bare LaTeX answer (see the module doc); a GraderPool function."""
    from math_verify import parse

    # Percent signs dropped as the math grader does: `25\%`, `25%` and `25` are one vote (`0.25` is not).
    parsed = parse("\\boxed{" + strip_percent(answer) + "}", parsing_timeout=None)
    exprs = [p for p in parsed if not isinstance(p, str)]
    if not exprs:
        return "str:" + "".join((parsed[-1] if parsed else answer).split())
    return _key(exprs[0])


CANONICALISERS = {"math": "math_key"}  # task name -> GraderPool function; other tasks: the string itself


# Bumped whenever a canonicaliser changes what it returns (v2: percent signs dropped), so that an on-disk cache
# written by an older version is ignored rather than mixing two kinds of key.
KEYS_VERSION = 2


class AnswerKeys:
    """Canonical keys of answer strings, computed once per (task, answer) in a process pool and cached (also
    on disk when `cache_path` is given)."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, cache_path: str | Path | None = None):
        self.workers, self.timeout_s = workers, timeout_s
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, dict[str, str]] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            self.cache = {section: keys for section, keys in json.loads(self.cache_path.read_text()).items()
                          if section.endswith(f"@v{KEYS_VERSION}")}
        self.stats = {"computed": 0, "timeouts": 0, "errors": 0}
        self._pools: dict[str, GraderPool] = {}

    def keys(self, task: str, answers: list[str]) -> dict[str, str]:
        """answer -> key for every answer (missing ones computed in one batch)."""
        fn = CANONICALISERS.get(task)
        if fn is None:
            return {a: a for a in answers}
        cache = self.cache.setdefault(f"{task}@v{KEYS_VERSION}", {})
        todo = sorted({a for a in answers if a not in cache})
        if todo:
            if fn not in self._pools:
                self._pools[fn] = GraderPool(fn, workers=self.workers, timeout_s=self.timeout_s)
            values, stats = self._pools[fn].map(todo, [""] * len(todo))
            self.stats["computed"] += len(todo)
            self.stats["timeouts"] += stats["timeouts"]
            self.stats["errors"] += stats["errors"]
            cache.update({a: v if isinstance(v, str) else "str:" + a for a, v in zip(todo, values)})
        return {a: cache[a] for a in answers}

    def vote_keys(self, task: str, pool: list[list[dict]]) -> list[list]:
        """Per row: None (no answer: never votes), ("correct",), or ("wrong", key of its answer)."""
        keys = self.keys(task, [r["answer"] for rows in pool for r in rows
                                if r["answer"] is not None and not r["correct"]])
        return [[None if r["answer"] is None else ("correct",) if r["correct"] else ("wrong", keys[r["answer"]])
                 for r in rows] for rows in pool]

    def save(self) -> None:
        if self.cache_path is not None:
            atomic_write_text(self.cache_path, json.dumps(self.cache))

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def __enter__(self) -> AnswerKeys:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
