"""Synthetic subset-sum: a task a small model learns on CPU in minutes, with a generation-verification gap.

Prompt `9,4,3,2,6:16` (distinct numbers, a target reached by exactly one subset); a solution is a chain
of additions over the chosen numbers in prompt order, `9+4=13;13+3=16`. Producing it needs a search,
checking it is local (are the numbers the prompt's, each used once, the sums right, the end the target).
The answer (what votes) is the chosen set; it is unique by construction.
Difficulty knobs: how many numbers, their digits, the subset sizes, the minimum target. The default
(five one-digit numbers) is one a 0.8M-parameter model learns in minutes on CPU; with two-digit numbers it
was still guessing most sums after 1000 warm-start steps, so its errors were arithmetic, not search.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

from rlv_megatron.tasks.chat import DEFAULT_QUESTION

_STEP = re.compile(r"^(\d+)\+(\d+)=(\d+)$")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "Yes", "No"]
CHARS = list("0123456789+=;,:#")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass(frozen=True)
class SubsetSumConfig:
    n_numbers: int = 5
    digits: int = 1
    subset_sizes: tuple[int, ...] = (2, 3)
    min_target: int = 10


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str  # the gold set, e.g. "15,43,59"
    numbers: tuple[int, ...] = ()
    target: int = 0
    subset: tuple[int, ...] = ()


def make_tokenizer(question: str = DEFAULT_QUESTION):
    """A character-level HF tokenizer; the verification question is one added token (short sequences)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + [question]
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": specials[3:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _subsets(numbers):
    for r in range(1, len(numbers) + 1):
        yield from itertools.combinations(range(len(numbers)), r)


def make_problem(rng: random.Random, cfg: SubsetSumConfig, pid: str) -> Problem:
    lo, hi = 10 ** (cfg.digits - 1), 10 ** cfg.digits - 1
    while True:
        numbers = tuple(rng.sample(range(lo, hi + 1), cfg.n_numbers))
        idx = tuple(sorted(rng.sample(range(cfg.n_numbers), rng.choice(cfg.subset_sizes))))
        target = sum(numbers[i] for i in idx)
        if target < cfg.min_target:
            continue
        if sum(1 for s in _subsets(numbers) if sum(numbers[i] for i in s) == target) != 1:
            continue  # the answer must be unique, or voting over answers is meaningless
        subset = tuple(numbers[i] for i in idx)
        return Problem(pid, f"{','.join(map(str, numbers))}:{target}", answer_key(subset), numbers, target, subset)


def problems(n: int, seed: int, cfg: SubsetSumConfig = SubsetSumConfig(), exclude: set[str] = frozenset()
             ) -> list[Problem]:
    """n distinct problems (by prompt); `exclude` keeps held-out prompts out of training."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        p = make_problem(rng, cfg, f"subset_sum:{seed}:{len(out)}")
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def trace(chosen: tuple[int, ...], wrong_last: int | None = None) -> str:
    """The addition chain over `chosen`; `wrong_last` replaces the final sum (a corrupted trace)."""
    steps, acc = [], chosen[0]
    for i, x in enumerate(chosen[1:]):
        total = acc + x
        shown = wrong_last if (wrong_last is not None and i == len(chosen) - 2) else total
        steps.append(f"{acc}+{x}={shown}")
        acc = shown
    return ";".join(steps)


def answer_key(numbers) -> str:
    return ",".join(map(str, sorted(numbers)))


def extract_answer(text: str) -> str | None:
    """The chosen set from a solution, or None if it is not a well-formed chain."""
    steps = text.strip().split(";")
    chosen, acc = [], None
    for s in steps:
        m = _STEP.match(s)
        if not m:
            return None
        a, b, c = map(int, m.groups())
        if acc is None:
            chosen.append(a)
        elif a != acc:
            return None  # a chain must carry its running sum
        chosen.append(b)
        acc = c
    return answer_key(chosen) if chosen else None


def grade(text: str, gold: str) -> float:
    return 1.0 if extract_answer(text) == gold else 0.0


def _wrong_subset(p: Problem, rng: random.Random) -> tuple[int, ...]:
    while True:
        idx = sorted(rng.sample(range(len(p.numbers)), rng.choice((2, 3))))
        chosen = tuple(p.numbers[i] for i in idx)
        if answer_key(chosen) != p.answer:
            return chosen


def _reaching_target(p: Problem, rng: random.Random, extra) -> tuple[int, ...] | None:
    """Prompt numbers (one or two) plus one number `extra(rest, needed)` that makes the sums reach the
    target with correct arithmetic; None when no such chain exists for this problem."""
    lo, hi = 10 ** (len(str(min(p.numbers))) - 1), 10 ** len(str(max(p.numbers))) - 1
    options = []
    for r in (1, 2):
        for rest in itertools.combinations(p.numbers, r):
            x = extra(rest, p.target - sum(rest))
            if x is not None and lo <= x <= hi:
                options.append(rest + (x,))
    if not options:
        return None
    chosen = list(rng.choice(options))
    x = chosen.pop()
    chosen.insert(rng.randrange(len(chosen) + 1), x)
    return tuple(chosen)


def _invented(p, rng):
    """A number that is not in the prompt, chosen so the chain ends exactly at the target."""
    return _reaching_target(p, rng, lambda rest, needed: needed if needed not in p.numbers else None)


def _repeated(p, rng):
    """A prompt number used twice, ending exactly at the target."""
    return _reaching_target(p, rng, lambda rest, needed: needed if needed in rest else None)


def corrupted_trace(p: Problem, rng: random.Random) -> str:
    """A wrong solution for the verification warm start, of the kinds a small solver makes and a checker
    must catch: a wrong subset with correct sums (its end misses the target), a wrong subset whose last sum
    is replaced by the target, a number invented or used twice so that correct sums reach the target.
    (The last two are most of a warm-started policy's mistakes; a verifier that never saw them accepts them.)"""
    kind = rng.choices(("wrong_subset", "forced_target", "invented", "repeated"), weights=(3, 2, 3, 2))[0]
    chosen = {"invented": _invented, "repeated": _repeated}.get(kind, lambda *_: None)(p, rng)
    if chosen is not None:
        return trace(chosen)
    chosen = _wrong_subset(p, rng)
    return trace(chosen, wrong_last=p.target) if kind == "forced_target" else trace(chosen)
