"""Warm start: SFT on correct solutions, and (optionally) the verification format on correct and wrong
ones, so RL starts from a model that can already answer the verification question (toy-findings.md)."""

from __future__ import annotations

import math
import random

from tqdm import tqdm

from rlv_megatron.rollout.placement import Placement, my_share
from rlv_megatron.train.step import sft_objective
from rlv_megatron.train.seeds import step_seed
from rlv_megatron.train.batch import build_sequences


def warm_start(policy, task, fmt, cfg, metrics=None) -> dict:
    if task.sft_pairs is None:
        raise ValueError(f"task.name={task.name}: has no warm-start data (sft.steps must be 0)")
    place = Placement.current()
    tok = task.tokenizer
    last = {}
    for step in tqdm(range(cfg.sft.steps), desc="sft", mininterval=5, disable=place.dp_rank + place.tp_rank +
                     place.pp_rank > 0):
        policy.set_lr(sft_lr(step, cfg.sft))
        # every rank draws the same problems (seeded per step); each data-parallel replica trains on its share
        problems = my_share(task.sample_train(cfg.sft.batch_size, seed=step_seed(cfg.train.seed, step, -3)),
                            place)
        rng = random.Random(step_seed(cfg.train.seed, step, -4 - place.dp_rank))  # the corruptions
        good, bad = task.sft_pairs(problems, rng)
        pairs = good + (bad if cfg.sft.verify else [])
        prompts = [fmt.prompt_ids(p) for p, _ in pairs]
        responses = [tok.encode(s, add_special_tokens=False) + [fmt.eos_id] for _, s in pairs]
        n_good = len(good)
        batch = build_sequences(fmt, prompts, responses, rewards=[1.0] * n_good + [0.0] * (len(pairs) - n_good),
                                advantages=[0.0] * len(pairs), verify=[cfg.sft.verify] * len(pairs),
                                pad_id=tok.pad_token_id, policy=[True] * n_good + [False] * (len(pairs) - n_good))
        last = policy.train_step(batch, sft_objective(batch, policy.vocab, fmt.yes_id, fmt.no_id,
                                                      cfg.verifier.loss, policy.groups.dp))
        if metrics is not None and step % 20 == 0:
            metrics.log(step, last)
    policy.reset_optimizer(cfg.optim.lr)  # RL starts with fresh optimizer states at its own lr
    return last


def sft_lr(step: int, sft) -> float:
    """Linear warm-up to sft.lr, then cosine decay to sft.lr * sft.min_lr_ratio at the last step."""
    if step < sft.warmup_steps:
        return sft.lr * (step + 1) / sft.warmup_steps
    progress = (step - sft.warmup_steps) / max(sft.steps - sft.warmup_steps - 1, 1)
    floor = sft.lr * sft.min_lr_ratio
    return floor + (sft.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
