"""Task registry: each task gives problems, a tokenizer, a batch grader and an answer key for voting."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from rlv_megatron.config import ConfigError, TaskConfig
from rlv_megatron.registry import Registry

TASKS = Registry("task.name")
register_task = TASKS.register


@dataclass
class Task:
    name: str
    eval: list  # held-out problems with .id, .prompt, .answer
    sample_train: Callable[[int, int], list]  # (n, seed) -> n training problems, disjoint from eval
    tokenizer: object
    grade: Callable[[list[str], list[str]], tuple[list[float], dict]]
    answer_key: Callable[[str], str | None]
    # (prompt, solution text) pairs for the warm start: correct ones, and wrong ones for the verifier
    sft_pairs: Callable[[list, random.Random], tuple[list[tuple[str, str]], list[tuple[str, str]]]] | None = None
    close: Callable[[], None] = field(default=lambda: None)


def make_task(cfg: TaskConfig, question: str, num_eval: int, seed: int = 0, tokenizer_path: str | None = None) -> Task:
    return TASKS.lookup(cfg.name)(cfg, question, num_eval, seed, tokenizer_path)


def answer_extractor(name: str) -> Callable[[str], str | None]:
    """The answer a task reads from a response (None: no answer), by task.name."""
    from rlv_megatron.tasks import graders, subset_sum

    TASKS.lookup(name)  # an unknown name fails as the config field
    return {"subset_sum": subset_sum.extract_answer, "math": graders.extract_boxed,
            "gsm8k": graders.extract_gsm8k}[name]


@register_task("subset_sum")
def _subset_sum(cfg: TaskConfig, question: str, num_eval: int, seed: int, tokenizer_path=None) -> Task:
    from rlv_megatron.tasks import subset_sum as ss

    scfg = ss.SubsetSumConfig(n_numbers=cfg.n_numbers, min_number=cfg.min_number, max_number=cfg.max_number,
                              min_target=cfg.min_target)
    if num_eval > cfg.held_out:
        raise ConfigError(f"eval.num_problems={num_eval}: more than the task.held_out={cfg.held_out} problems "
                          "reserved for evaluation")
    # a fixed reserve, whatever eval.num_problems is: a run that evaluates on more problems than an earlier
    # one (a warm start, say) must not meet problems that the earlier one trained on
    reserved = ss.problems(cfg.held_out, seed=10_000 + seed, cfg=scfg)
    held_out = reserved[:num_eval]
    # training problems are drawn on the fly; none of them is a reserved one, in any order
    exclude = {ss.problem_key(p) for p in reserved}

    from rlv_megatron.tasks import graders

    # out of process like the other tasks' graders (a crash or a hang costs a sample, not the run)
    pool = graders.GraderPool("subset_sum", workers=cfg.grader_workers, timeout_s=cfg.grader_timeout_s)

    def sft_pairs(problems, rng):
        good = [(p.prompt, ss.trace(p.subset)) for p in problems]
        bad = [(p.prompt, ss.corrupted_trace(p, rng, scfg)) for p in problems]
        return good, bad

    return Task("subset_sum", held_out, lambda n, seed: ss.problems(n, seed=seed, cfg=scfg, exclude=exclude),
                _subset_sum_tokenizer(question, tokenizer_path), pool.grade, answer_extractor("subset_sum"), sft_pairs,
                pool.close)


def _subset_sum_tokenizer(question: str, model_dir: str | None):
    """The character tokenizer for a scratch model; a model directory's own tokenizer otherwise (a run's
    start/ or model/ export holds the character one; any other model trains on its own tokens)."""
    from pathlib import Path

    from rlv_megatron.tasks import subset_sum as ss

    if model_dir is None:
        return ss.make_tokenizer(question)
    # without these files transformers builds an empty tokenizer from config.json instead of failing
    if not any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"model.path={model_dir}: no tokenizer (tokenizer.json or tokenizer_config.json); "
                          "task.name=subset_sum uses the model's own tokenizer when model.path is set")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _dataset_task(name: str, grader: str, loader_name: str):
    """MATH / GSM8K (or any user jsonl/parquet with the same fields), graded in a process pool."""

    def make(cfg: TaskConfig, question: str, num_eval: int, seed: int, tokenizer_path=None) -> Task:
        from transformers import AutoTokenizer

        from rlv_megatron.tasks import graders, math_data

        for field_name in ("train_path", "eval_path") if num_eval else ("train_path",):  # 0: no evaluation
            if getattr(cfg, field_name) is None:
                raise ConfigError(f"task.{field_name}: required for task.name={name} (a jsonl or parquet file)")
        if tokenizer_path is None:
            raise ConfigError(f"model.path: task.name={name} needs the model's Hugging Face tokenizer")
        load = getattr(math_data, loader_name)
        train = load(cfg.train_path, skip_invalid=True)
        held_out = load(cfg.eval_path)[:num_eval] if num_eval else []
        pool = graders.GraderPool(grader, workers=cfg.grader_workers, timeout_s=cfg.grader_timeout_s)
        return Task(name, held_out, lambda n, seed: random.Random(seed).sample(train, n),
                    AutoTokenizer.from_pretrained(tokenizer_path), pool.grade,
                    answer_extractor(name), close=pool.close)

    register_task(name)(make)


_dataset_task("math", "math", "load_math")
_dataset_task("gsm8k", "gsm8k", "load_gsm8k")
