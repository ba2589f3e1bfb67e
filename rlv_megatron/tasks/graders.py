"""Answer extraction, a registry of graders, and a process pool that grades with a per-item time limit.

Graders are plain functions `(response_text, gold_answer) -> float` (1.0 or 0.0). math-verify (sympy) can
hang or crash on adversarial model output, and it uses signal.alarm, so it cannot run in threads: the pool
runs graders in worker processes and enforces time limits itself, killing and replacing stuck workers.
The pool also maps other registered two-argument functions (`GraderPool.map`: any picklable result), e.g.
the canonical answer keys of rlv_megatron/eval/equivalence.py.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import re
import signal
import time
import traceback
import weakref
from collections import deque
from multiprocessing.connection import wait
from typing import Callable

from math_verify import parse, verify

__all__ = [
    "GRADERS",
    "GraderPool",
    "extract_boxed",
    "extract_gsm8k",
    "register_grader",
    "strip_percent",
]

Grader = Callable[[str, str], float]
GRADERS: dict[str, Grader] = {}


def register_grader(name: str) -> Callable[[Grader], Grader]:
    """Decorator: register a module-level grader function under `name` (usable by GraderPool)."""

    def deco(fn: Grader) -> Grader:
        old = GRADERS.get(name)
        # Re-registering the same function (module re-import in a worker, reload) is fine; a clash is a bug.
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"grader {name!r} is already registered as {old.__module__}.{old.__qualname__}")
        GRADERS[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------------------------------------------------
# Extraction

# A box command (not a longer name like `\fboxsep`), then `{`, or after whitespace a bare token: the old
# MATH form `\boxed 5$` (Hendrycks MATH train has a few).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*(?:(\{)|(?<=\s)([^\s${}]+))")
# Skip escaped characters (`\{`, `\}`, `\\`) so literal braces do not count towards the balance.
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces balanced), else None.

    An unbalanced last box gives None. Linear in len(text): one forward regex pass finds the last box,
    one more visits only its braces (no per-character Python loop).
    """
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    if last.group(2) is not None:
        return last.group(2)
    depth = 0
    for b in _BRACE_RE.finditer(text, last.start(1)):
        if b.group(0) == "{":
            depth += 1
        elif b.group(0) == "}":
            depth -= 1
            if depth == 0:
                return text[last.end(1) : b.start()]
    return None


# Thousands-grouped (1,234,567) or plain digits, optional decimals; `-` is a sign only when it is not a
# binary minus (not preceded by a word character or a closing bracket).
_NUM_RE = re.compile(r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _normalise_number(s: str) -> str:
    s = s.replace(",", "")
    if "." in s:
        whole, frac = s.split(".", 1)
        if frac.strip("0") == "":
            s = whole
    if s in ("-0", "-"):
        s = "0"
    return s


def extract_gsm8k(text: str) -> str | None:
    """GSM8K-style final answer: the number after the last `####`, else the last number in the text.

    Returns a normalised number string (no commas; `18.00` -> `18`), or None if there is no number.
    """
    cut = text.rfind("####")
    if cut >= 0:
        m = _NUM_RE.search(text, cut + 4)
        return _normalise_number(m.group(0)) if m else None
    last = None
    for last in _NUM_RE.finditer(text):
        pass
    return _normalise_number(last.group(0)) if last else None


# ---------------------------------------------------------------------------------------------------------
# Graders


def _quiet_math_verify() -> None:
    """Hide math-verify's one-off 'timeout is disabled' warning: the pool bounds time instead."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(keep)


_quiet_math_verify()


# A percent sign: `\%`, `%`, `\\%` (a doubly escaped one) or `\text{\%}`.
_PERCENT_RE = re.compile(r"\\(?:text|textrm|mbox)\s*\{\s*\\*%\s*\}|\\*%")


def strip_percent(answer: str) -> str:
    """`answer` without its percent signs, as MATH's own answer check does (Hendrycks et al. drop `\\%`).

    math-verify reads `25\\%` as a plain string, so `25` would never match it. The bare number is the answer
    in MATH practice: `25\\%` and `25` agree (either side gold), but `25\\%` and `0.25` do not.
    """
    out = _PERCENT_RE.sub("", answer).strip()
    return out or answer


@register_grader("math")
def grade_math(response: str, gold: str) -> float:
    """Last boxed answer of the response vs. a bare LaTeX gold answer, by math-verify equivalence."""
    pred = extract_boxed(response)
    if pred is None:
        return 0.0
    # Timeouts off (signal.alarm); GraderPool enforces the time limit by killing the worker.
    g = parse("\\boxed{" + strip_percent(gold) + "}", parsing_timeout=None)
    p = parse("\\boxed{" + strip_percent(pred) + "}", parsing_timeout=None)
    return 1.0 if g and p and verify(g, p, timeout_seconds=None) else 0.0


def _to_float(s: str | None) -> float | None:
    try:
        x = float(s) if s is not None else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


@register_grader("gsm8k")
def grade_gsm8k(response: str, gold: str) -> float:
    """Final number of the response (see extract_gsm8k) equals the gold number within 1e-6."""
    p, g = _to_float(extract_gsm8k(response)), _to_float(extract_gsm8k(gold))
    if p is None or g is None:
        return 0.0
    return 1.0 if math.isclose(p, g, rel_tol=1e-9, abs_tol=1e-6) else 0.0


@register_grader("exact")
def grade_exact(response: str, gold: str) -> float:
    return 1.0 if response.strip() == gold.strip() else 0.0


@register_grader("subset_sum")
def grade_subset_sum(response: str, gold: str) -> float:
    from rlv_megatron.tasks import subset_sum

    return subset_sum.grade(response, gold)


# ---------------------------------------------------------------------------------------------------------
# Process pool

_START_TIMEOUT_S = 120.0  # a fresh interpreter importing the grader module (sympy) on a loaded machine


def _resolve(module: str, qualname: str) -> Grader:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(conn, module: str, qualname: str) -> None:
    """Worker loop: import the grader, say ready, then grade (idx, response, gold) until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    try:
        import setproctitle  # a vLLM dependency: `ps` (and benchmarks/chaos.py) tell graders apart

        setproctitle.setproctitle("rlv::grader")
    except ImportError:
        pass
    try:
        fn = _resolve(module, qualname)
    except BaseException:
        conn.send(("fatal", None, traceback.format_exc()))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if msg is None:
            return
        idx, response, gold = msg
        try:
            out = ("ok", idx, fn(response, gold))
        except BaseException as e:  # SystemExit too: one bad item must not take the worker down
            out = ("error", idx, f"{type(e).__name__}: {e}")
        conn.send(out)


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx, module: str, qualname: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, module, qualname), daemon=True)
        self.proc.start()
        child.close()  # so that the worker dying gives EOF here
        self.started = time.monotonic()
        self.ready = False
        self.item: int | None = None  # index being graded
        self.deadline = math.inf

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    idle = [w for w in workers if w.ready and w.item is None]
    for w in idle:  # ask all idle workers first, so they exit in parallel
        try:
            w.conn.send(None)
        except OSError:
            pass
    for w in idle:
        w.proc.join(2)
    for w in workers:  # then kill whatever is left: starting, busy (error or Ctrl-C mid-batch) or slow
        w.kill()
    workers.clear()


class GraderPool:
    """Grade batches in `workers` processes; each item gets `timeout_s` from the moment a worker takes it.

    A timed-out item (its worker is killed and replaced), a grader exception, or an item whose worker dies
    under it twice (os._exit, segfault) scores 0.0 and is counted in the stats ("errors" for deaths); the pool
    keeps working afterwards. A worker that dies once (killed from outside, the OOM killer) is replaced and
    its item graded again, so a killed worker changes no score.
    """

    def __init__(self, grader: str, workers: int = 2, timeout_s: float = 5.0):
        if grader not in GRADERS:
            raise ValueError(f"unknown grader {grader!r}; registered: {sorted(GRADERS)}")
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
        fn = GRADERS[grader]
        # Workers import the grader by module and qualified name, so graders registered outside this
        # module (e.g. in a test module) work too; a worker's own registry would not know them.
        self._target = (fn.__module__, fn.__qualname__)
        if "<" in fn.__qualname__:
            raise ValueError(f"grader {grader!r} ({fn.__qualname__}) must be a module-level function")
        self.grader, self.timeout_s = grader, float(timeout_s)
        from rlv_megatron.mp_guard import require_main_guard

        require_main_guard("GraderPool")  # spawn re-runs an unguarded script in each worker
        self._ctx = mp.get_context("spawn")  # no fork: the caller may hold threads, CUDA, big heaps
        self._workers = [_Worker(self._ctx, *self._target) for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()  # idempotent

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._ctx, *self._target)

    def grade(self, responses: list[str], golds: list[str]) -> tuple[list[float], dict]:
        """Scores (0.0 for timed-out or failed items) and {"graded": n, "timeouts": t, "errors": e}."""
        values, stats = self.map(responses, golds)
        scores = [0.0] * len(values)
        for i, v in enumerate(values):
            try:
                scores[i] = 0.0 if v is None else float(v)
            except (TypeError, ValueError):  # a grader that returned something other than a number
                stats["errors"] += 1
        return scores, stats

    def map(self, responses: list[str], golds: list[str]) -> tuple[list, dict]:
        """The function's results as returned (None for timed-out or failed items), and the stats of grade()."""
        if not self._finalizer.alive:
            raise RuntimeError("GraderPool is closed")
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        try:
            return self._map(responses, golds)
        except BaseException:
            # Workers may still be busy with this batch; their late results must not reach the next one.
            self.close()
            raise

    def _map(self, responses: list[str], golds: list[str]) -> tuple[list, dict]:
        n = len(responses)
        values = [None] * n
        stats = {"graded": n, "timeouts": 0, "errors": 0}
        pending = deque(range(n))
        crashed: set[int] = set()  # items whose worker died under them once: graded again on a new one
        ws = self._workers
        while pending or any(w.item is not None for w in ws):
            for i, w in enumerate(ws):  # hand items to idle, ready workers
                if w.ready and w.item is None and pending:
                    idx = pending.popleft()
                    try:
                        w.conn.send((idx, responses[idx], golds[idx]))
                    except OSError:  # died while idle: not this item's fault, retry it elsewhere
                        pending.appendleft(idx)
                        self._replace(i)
                        continue
                    w.item, w.deadline = idx, time.monotonic() + self.timeout_s
            now = time.monotonic()
            wake = min([w.deadline for w in ws] + [w.started + _START_TIMEOUT_S for w in ws if not w.ready])
            ready = wait([w.conn for w in ws], timeout=max(0.0, wake - now))
            now = time.monotonic()
            for i, w in enumerate(ws):
                if w.conn in ready:
                    try:
                        kind, idx, val = w.conn.recv()
                    except (EOFError, OSError):
                        kind, idx, val = "died", None, None
                    if kind == "ready":
                        w.ready = True
                    elif kind == "ok":
                        values[idx] = val
                        w.item, w.deadline = None, math.inf
                    elif kind == "error":
                        stats["errors"] += 1
                        w.item, w.deadline = None, math.inf
                    elif kind == "fatal":
                        raise RuntimeError(f"grader worker for {self.grader!r} failed to start:\n{val}")
                    else:  # the process died (os._exit, segfault, killed by the OOM killer or a user)
                        if not w.ready:
                            raise RuntimeError(f"grader worker for {self.grader!r} died while starting")
                        if w.item is not None and w.item not in crashed:  # maybe not the item's fault
                            crashed.add(w.item)
                            pending.appendleft(w.item)
                        elif w.item is not None:  # it kills its worker: it fails
                            stats["errors"] += 1
                        self._replace(i)
                elif w.item is not None and now >= w.deadline:
                    stats["timeouts"] += 1
                    self._replace(i)  # a running call cannot be cancelled: kill the process
                elif not w.ready and now >= w.started + _START_TIMEOUT_S:
                    raise RuntimeError(f"grader worker for {self.grader!r} not ready in {_START_TIMEOUT_S}s")
        return values, stats
