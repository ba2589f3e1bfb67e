"""Synthetic subset-sum: a task a small model learns on CPU in minutes, with a generation-verification gap.

Prompt `59,63,15,43:117` (distinct numbers, a target reached by exactly one subset); a solution is a
chain of additions over the chosen numbers in prompt order, `59+15=74;74+43=117`. Producing it needs a
search, checking it is local. The answer (what votes) is the chosen set; it is unique by construction.
Difficulty knobs: how many numbers, their digits, the subset sizes, the minimum target.
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
    digits: int = 2
    subset_sizes: tuple[int, ...] = (2, 3)
    min_target: int = 100


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


def corrupted_trace(p: Problem, rng: random.Random) -> str:
    """A wrong solution for the verification warm start: a wrong subset, with correct sums (60%) or with
    its last sum replaced by the target (40%): the two mistakes a checker must catch."""
    while True:
        idx = sorted(rng.sample(range(len(p.numbers)), rng.choice((2, 3))))
        chosen = tuple(p.numbers[i] for i in idx)
        if answer_key(chosen) != p.answer:
            break
    return trace(chosen) if rng.random() < 0.6 else trace(chosen, wrong_last=p.target)
