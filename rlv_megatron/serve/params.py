"""A request's test-time strategy: the fields of an OpenAI request body (extra_body included, which the
`openai` client merges into the body), checked, with the server's defaults (serve.*) for those it omits.
A bad field is a BadRequest naming it (HTTP 400)."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from rlv_megatron.config import _CHOICES

STRATEGIES = _CHOICES["serve.strategy"]  # serve/strategy.py defines each


class BadRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class Params:
    strategy: str
    n: int  # samples of a fixed strategy; adaptive: the first round's
    adaptive: bool
    round_size: int
    min_confidence: float
    max_samples: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int  # sample j is drawn with seed + j (given, or picked by the server and returned)

    def round_samples(self, drawn: int) -> int:
        """How many samples the next round draws after `drawn` (0: none; the request is answered)."""
        if self.strategy == "single":
            return 1 - min(drawn, 1)
        if not self.adaptive:
            return self.n - min(drawn, self.n)
        return min(self.round_size if drawn else self.n, self.max_samples - drawn)


def _number(body: dict, name: str, default, kind, low=None, high=None, low_open=False):
    value = body.get(name)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(name, f"{value!r} is not {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    if not math.isfinite(value):
        raise BadRequest(name, f"{value!r} is not finite")
    if low is not None and (value <= low if low_open else value < low):
        raise BadRequest(name, f"{value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise BadRequest(name, f"{value!r} must be <= {high}")
    return value


def server_defaults(cfg):
    """cfg.serve with its open defaults filled: the response budget of training (algo.max_tokens) and the
    temperature of evaluation (eval.temperature)."""
    serve = cfg.serve
    return dataclasses.replace(
        serve, max_tokens=cfg.algo.max_tokens if serve.max_tokens is None else serve.max_tokens,
        temperature=cfg.eval.temperature if serve.temperature is None else serve.temperature)


def parse(body: dict, serve) -> Params:
    """Params of a request body; `serve`: the server's ServeConfig (server_defaults: its defaults and limits)."""
    if body.get("stream"):
        raise BadRequest("stream", "streaming is not supported: the answer is chosen after every sample is scored")
    strategy = body.get("strategy", serve.strategy) or serve.strategy
    if strategy not in STRATEGIES:
        raise BadRequest("strategy", f"{strategy!r} is not one of {', '.join(STRATEGIES)}")
    adaptive = body.get("adaptive", serve.adaptive)
    if not isinstance(adaptive, bool):
        raise BadRequest("adaptive", f"{adaptive!r} is not true or false")
    if adaptive and strategy == "single":
        raise BadRequest("adaptive", "needs a voting strategy (majority, weighted or best_of), not single")
    limit = serve.max_n
    n = _number(body, "n", serve.round_size if adaptive and "n" not in body else serve.n, int, 1, limit)
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    seed = body.get("seed")
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    return Params(
        strategy=strategy, n=n, adaptive=adaptive,
        round_size=_number(body, "round_size", serve.round_size, int, 1, limit),
        min_confidence=_number(body, "min_confidence", serve.min_confidence, float, 0.0, 1.0, low_open=True),
        max_samples=_number(body, "max_samples", max(serve.max_samples, n), int, n, limit),
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", serve.max_tokens, int, 1),
        temperature=_number(body, "temperature", serve.temperature, float, 0.0, 10.0),
        top_p=_number(body, "top_p", serve.top_p, float, 0.0, 1.0, low_open=True),
        seed=_number({"seed": seed}, "seed", None, int, 0, 2**62))
