"""Partial rollouts (rollout/partial.py) with a fake engine whose samples have known lengths, 2 to 40 tokens
(a 20x spread): groups are trained only complete, samples continue where they stopped, every token keeps
the version that sampled it, a step does not wait for its longest sample, and a restored pool continues the
same samples. The real engine's continuation across a weight sync: tests/test_engine.py; the whole loop
with partial rollouts, resumed: tests/test_resume.py."""

from dataclasses import dataclass

import pytest

from rlv_megatron.config import Config, ConfigError, validate
from rlv_megatron.rollout.engine import Sample
from rlv_megatron.rollout.partial import PartialRollouts, partial_groups
from rlv_megatron.rollout.placement import Placement

EOS, WORD = 0, 7


class LengthEngine:
    """Prompt [L]: the response is L-1 WORD tokens then EOS. A token's log-prob encodes the engine's weights
    (-0.01 x version) and its position, so a test can tell which call and version produced it."""

    def __init__(self):
        self.weights, self.calls = 0, []

    def generate(self, prompts, n, max_tokens, min_tokens, seeds, stop_token_ids, temperature, top_p):
        assert n == 1 and len(max_tokens) == len(prompts) == len(seeds) == len(min_tokens)
        self.calls.append(list(max_tokens))
        outs = []
        for p, budget in zip(prompts, max_tokens):
            done, target = len(p) - 1, p[0]
            ids = [WORD if done + k + 1 < target else EOS for k in range(min(budget, target - done))]
            lps = [-0.01 * self.weights - 0.0001 * (done + k) for k in range(len(ids))]
            outs.append([Sample(ids, lps, "stop" if ids and ids[-1] == EOS else "length")])
        return outs


@dataclass(frozen=True)
class Problem:
    prompt: int  # the target length
    answer: str = ""


class LengthTask:
    """Problem i of a draw: length 40 for every fifth prompt of a step, else 2..5 (long-tailed)."""

    def sample_train(self, n, seed):
        return [Problem(40 if (seed + i) % 5 == 0 else 2 + (seed + i) % 4) for i in range(n)]


class Fmt:
    eos_id = EOS

    def prompt_ids(self, prompt):
        return [prompt]


def _cfg(**rollout):
    cfg = Config()
    cfg.algo.prompts_per_step, cfg.algo.group_size, cfg.algo.max_tokens, cfg.algo.min_tokens = 4, 2, 48, 0
    cfg.rollout.max_step_tokens, cfg.rollout.partial_spare_groups = 8, 4
    for k, v in rollout.items():
        setattr(cfg.rollout, k, v)
    return cfg


def _run(steps, cfg, pool=None, start=0, engine=None):
    engine = engine or LengthEngine()
    pool = pool or PartialRollouts(cfg.rollout.max_step_tokens, cfg.train.seed)
    trained = []
    for step in range(start, steps):
        engine.weights = step  # sync mode: the step's own weights
        problems, prompts, outs, stats = partial_groups(step, step, pool, engine, LengthTask(), Fmt(), cfg,
                                                        Placement())
        trained.append((step, prompts, outs, stats))
    return trained, pool, engine


def test_groups_are_trained_complete_and_samples_whole():
    trained, _, engine = _run(12, _cfg())
    lengths = set()
    for step, prompts, outs, _ in trained:
        assert len(outs) == 4  # prompts_per_step groups every step
        for (target,), group in zip(prompts, outs):
            for s in group:
                assert s.finish_reason == "stop" and len(s.token_ids) == target  # continued, not restarted
                assert s.token_ids == [WORD] * (target - 1) + [EOS]
                assert len(s.versions) == len(s.logprobs) == target
                lengths.add(target)
    assert max(lengths) / min(lengths) >= 10  # the task's lengths vary 20x
    assert max(max(c) for c in engine.calls) <= 8  # no call gives a sample more than max_step_tokens


def test_long_samples_do_not_hold_the_step_and_keep_their_versions():
    trained, _, _ = _run(12, _cfg())
    long_ones = [(step, group) for step, prompts, outs, _ in trained for (t,), group in zip(prompts, outs) if t == 40]
    assert long_ones  # they do get trained, later
    for step, group in long_ones:
        for s in group:
            # 40 tokens at 8 a round: the sample spans >= 5 rounds, over earlier steps' weights
            assert len(set(s.versions)) >= 2 and max(s.versions) <= step and s.versions == sorted(s.versions)
            for k, (lp, v) in enumerate(zip(s.logprobs, s.versions)):
                assert lp == pytest.approx(-0.01 * v - 0.0001 * k)  # the log-prob of the weights that sampled it
    rounds = [stats["rollout/partial_rounds"] for *_, stats in trained]
    assert max(rounds) < 5  # a step never ran the 5 rounds a 40-token sample needs
    assert any(stats["rollout/partial_carried_fraction"] > 0 for *_, stats in trained)


def test_pool_stays_at_its_size_and_takes_oldest_first():
    cfg = _cfg()
    trained, pool, _ = _run(6, cfg)
    assert len(pool.groups) == cfg.rollout.partial_spare_groups  # refilled to 8, 4 trained a step
    admitted = [(g.step, g.index) for g in pool.groups]
    assert admitted == sorted(admitted)


def test_a_restored_pool_continues_the_same_samples():
    cfg = _cfg()
    whole, _, _ = _run(10, cfg)
    _, pool, _ = _run(4, cfg)
    restored = PartialRollouts(cfg.rollout.max_step_tokens, cfg.train.seed)
    restored.load(pool.state())
    resumed, _, _ = _run(10, cfg, pool=restored, start=4)
    assert [(s, p, o) for s, p, o, _ in resumed] == [(s, p, o) for s, p, o, _ in whole[4:]]


def test_partial_rollouts_need_the_importance_sampling_correction():
    cfg = _cfg()
    cfg.algo.tis_cap = None
    with pytest.raises(ConfigError, match="algo.tis_cap"):
        validate(cfg)
    cfg = _cfg(max_step_tokens=-1)
    with pytest.raises(ConfigError, match="rollout.max_step_tokens=-1"):
        validate(cfg)
