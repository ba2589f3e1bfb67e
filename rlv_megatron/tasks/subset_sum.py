"""Synthetic subset-sum: a task a small model learns on CPU in minutes, with a generation-verification gap.

Prompt `9,14,3,6:26` (distinct numbers, a target reached by exactly one subset); a solution is a chain
of additions over the chosen numbers in prompt order, `9+14=23;23+3=26`. Producing it needs a search,
checking it is local (are the numbers the prompt's, each used once, the sums right, the end the target).
The answer (what votes) is the chosen set; it is unique by construction. Held-out problems are distinct
as (set of numbers, target), and training never sees one of them in any order.
Difficulty knobs: how many numbers, their range, the subset sizes, the minimum target. The default (four
numbers in 1..15: 10,360 distinct problems) is one a 0.8M-parameter model learns in minutes on CPU (600
warm-start steps: pass@1 .17, pass@16 .73 on unseen problems). Two-digit numbers left it guessing most
sums after 1000 steps (its errors were arithmetic, not search); one-digit numbers give only 479 distinct
problems, too few to hold any out; five numbers in 1..15 left it at chance (pass@1 .05 of 20 subsets).
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
    n_numbers: int = 4
    min_number: int = 1
    max_number: int = 15
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
    lo, hi = cfg.min_number, cfg.max_number
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


def problem_key(p: Problem) -> tuple:
    """What makes two problems the same problem: the set of numbers and the target (not their order)."""
    return tuple(sorted(p.numbers)), p.target


def problems(n: int, seed: int, cfg: SubsetSumConfig = SubsetSumConfig(), exclude: set = frozenset()
             ) -> list[Problem]:
    """n distinct problems (by problem_key); `exclude` (keys) keeps held-out problems out of training."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        p = make_problem(rng, cfg, f"subset_sum:{seed}:{len(out)}")
        if problem_key(p) not in seen:
            seen.add(problem_key(p))
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


def _reaching_target(p: Problem, rng: random.Random, cfg: SubsetSumConfig, extra) -> tuple[int, ...] | None:
    """Prompt numbers (one or two) plus one number `extra(rest, needed)` from the task's range that makes
    the sums reach the target with correct arithmetic; None when no such chain exists for this problem."""
    options = []
    for r in (1, 2):
        for rest in itertools.combinations(p.numbers, r):
            x = extra(rest, p.target - sum(rest))
            if x is not None and cfg.min_number <= x <= cfg.max_number:
                options.append(rest + (x,))
    if not options:
        return None
    chosen = list(rng.choice(options))
    x = chosen.pop()
    chosen.insert(rng.randrange(len(chosen) + 1), x)
    return tuple(chosen)


def _invented(p, rng, cfg):
    """A number that is not in the prompt, chosen so the chain ends exactly at the target."""
    return _reaching_target(p, rng, cfg, lambda rest, needed: needed if needed not in p.numbers else None)


def _repeated(p, rng, cfg):
    """A prompt number used twice, ending exactly at the target."""
    return _reaching_target(p, rng, cfg, lambda rest, needed: needed if needed in rest else None)


def corrupted_trace(p: Problem, rng: random.Random, cfg: SubsetSumConfig = SubsetSumConfig()) -> str:
    """A wrong solution for the verification warm start, of the kinds a small solver makes and a checker
    must catch: a wrong subset with correct sums (its end misses the target), a wrong subset whose last sum
    is replaced by the target, a number invented or used twice so that correct sums reach the target.
    (The last two are most of a warm-started policy's mistakes; a verifier that never saw them accepts them.)"""
    kind = rng.choices(("wrong_subset", "forced_target", "invented", "repeated"), weights=(3, 2, 3, 2))[0]
    chosen = {"invented": _invented, "repeated": _repeated}.get(kind, lambda *_: None)(p, rng, cfg)
    if chosen is not None:
        return trace(chosen)
    chosen = _wrong_subset(p, rng)
    return trace(chosen, wrong_last=p.target) if kind == "forced_target" else trace(chosen)
