"""Partial rollouts (`rollout.max_step_tokens` > 0): one long sample no longer holds a whole step.

A replica keeps a pool of groups in progress, `prompts_per_step + rollout.partial_spare_groups` of them (its
share). A step admits new prompts to refill the pool, then runs generation rounds: in a round every
unfinished sample continues, from where it stopped, by at most `max_step_tokens` tokens (one engine call,
prompt + the tokens so far as its context). Rounds repeat until `prompts_per_step` groups are complete
(every sample ended in its stop token or reached algo.max_tokens); the step trains the oldest complete
groups, and the rest, finished or not, stay in the pool for later steps, where newer weights continue them
(as in Kimi k1.5's and slime's partial rollouts).

Every token records the weight version that sampled it; its engine log-prob is the sampling distribution's
of that version, so the policy loss corrects older tokens as it does stale samples (algo.off_policy,
algo.tis_cap). A sample is at most ceil(max_tokens / max_step_tokens) rounds long, so the lag of its oldest
token is bounded by that (plus rollout.max_staleness under overlap) unless complete groups queue up.
Groups are trained only whole: the group baseline of GRPO/RLOO needs every sample's reward.

The pool is the replica's state between steps and goes into checkpoints (`state`/`load`): a resumed run
continues the same samples. Sampling seeds are functions of (run seed, step, group, sample, round).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

from rlv_megatron.rollout.engine import Sample
from rlv_megatron.rollout.placement import Placement, my_share
from rlv_megatron.train.seeds import step_seed


@dataclass
class Draft:
    """One sample in progress."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # per token: the weights that sampled it
    finish: str | None = None  # "stop" | "length" once finished

    def sample(self) -> Sample:
        return Sample(self.tokens, self.logprobs, self.finish, self.versions)


@dataclass
class Group:
    step: int  # the step that admitted it
    index: int  # its prompt's global index among that step's admissions
    problem: object
    prompt: list[int]
    drafts: list[Draft]

    @property
    def complete(self) -> bool:
        return all(d.finish is not None for d in self.drafts)


class PartialRollouts:
    def __init__(self, max_step_tokens: int, seed: int):
        if max_step_tokens < 1:
            raise ValueError(f"rollout.max_step_tokens={max_step_tokens}: partial rollouts need at least 1")
        self.max_step_tokens, self.seed = max_step_tokens, seed
        self.groups: list[Group] = []  # in admission order: the oldest first

    def admit(self, step: int, problems: list, prompts: list[list[int]], first_index: int, group_size: int):
        for i, (problem, prompt) in enumerate(zip(problems, prompts)):
            self.groups.append(Group(step, first_index + i, problem, list(prompt),
                                     [Draft() for _ in range(group_size)]))

    def advance(self, step: int, rnd: int, version: int, engine, max_tokens: int, min_tokens: int,
                **sampling) -> int:
        """One round: every unfinished sample continues by up to max_step_tokens tokens, sampled by weights
        `version`. Returns the tokens generated."""
        open_ = [(g, j, d) for g in self.groups for j, d in enumerate(g.drafts) if d.finish is None]
        if not open_:
            return 0
        budgets = [min(self.max_step_tokens, max_tokens - len(d.tokens)) for _, _, d in open_]
        outs = engine.generate(
            [g.prompt + d.tokens for g, _, d in open_], n=1, max_tokens=budgets,
            min_tokens=[min(max(min_tokens - len(d.tokens), 0), b) for (_, _, d), b in zip(open_, budgets)],
            seeds=[step_seed(self.seed, step, zlib.crc32(f"{g.step}:{g.index}:{j}:{rnd}".encode()))
                   for g, j, _ in open_], **sampling)
        generated = 0
        for (_, _, d), (s,) in zip(open_, outs):
            d.tokens += s.token_ids
            d.logprobs += s.logprobs
            d.versions += [version] * len(s.token_ids)
            generated += len(s.token_ids)
            if s.finish_reason == "stop":
                d.finish = "stop"
            elif len(d.tokens) >= max_tokens:
                d.finish = "length"
        return generated

    def complete_count(self) -> int:
        return sum(g.complete for g in self.groups)

    def take(self, n: int) -> list[Group]:
        """The n oldest complete groups, out of the pool."""
        done = [g for g in self.groups if g.complete][:n]
        if len(done) < n:
            raise RuntimeError(f"{len(done)} complete groups, {n} wanted")
        taken = {id(g) for g in done}
        self.groups = [g for g in self.groups if id(g) not in taken]
        return done

    def state(self) -> list[dict]:
        return [{"step": g.step, "index": g.index, "problem": g.problem, "prompt": g.prompt,
                 "drafts": [asdict(d) for d in g.drafts]} for g in self.groups]

    def load(self, state: list[dict]) -> None:
        self.groups = [Group(**{**g, "drafts": [Draft(**d) for d in g["drafts"]]}) for g in state]


def partial_groups(step: int, version: int, pool: PartialRollouts, engine, task, fmt, cfg, place: Placement):
    """This step's complete groups from the pool, refilled with the step's new prompts first: (problems,
    prompt ids, samples per group, statistics). Engine rank only."""
    a = cfg.algo
    want = a.prompts_per_step // place.dp_size
    admit = (a.prompts_per_step + cfg.rollout.partial_spare_groups) // place.dp_size - len(pool.groups)
    if admit > 0:  # the same count on every replica: each trains `want` groups a step
        problems = my_share(task.sample_train(admit * place.dp_size, seed=step_seed(cfg.train.seed, step, 0)), place)
        pool.admit(step, problems, [fmt.prompt_ids(p.prompt) for p in problems], place.dp_rank * admit,
                   a.group_size)
    rounds = generated = 0
    while rounds == 0 or pool.complete_count() < want:  # at least one round: the new prompts start
        generated += pool.advance(step, rounds, version, engine, a.max_tokens, a.min_tokens,
                                  temperature=a.temperature, top_p=a.top_p, stop_token_ids=[fmt.eos_id])
        rounds += 1
    groups = pool.take(want)
    stats = {"rollout/partial_rounds": rounds, "rollout/partial_engine_tokens": generated,
             "rollout/partial_pending_groups": len(pool.groups),
             "rollout/partial_carried_fraction": sum(g.step < step for g in groups) / len(groups)}
    return ([g.problem for g in groups], [g.prompt for g in groups], [[d.sample() for d in g.drafts] for g in groups],
            stats)
