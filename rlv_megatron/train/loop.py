"""The RL^V loop: rollout -> reward -> advantages -> verifier batch -> train step(s) -> weight sync ->
metrics -> periodic eval and checkpoint. Reads like DESIGN.md's flow; the work lives in the modules.
Under rollout.mode=overlap the rollouts come from rollout/overlap.py, generated while earlier steps train."""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rlv_megatron import dashboards
from rlv_megatron.algos.advantages import compute_advantages, informative_groups
from rlv_megatron.dashboards import Metrics
from rlv_megatron.rollout.overlap import RolloutsAhead
from rlv_megatron.rollout.partial import PartialRollouts, partial_groups
from rlv_megatron.rollout.placement import Placement, dp_mean, my_share, share_from_engine
from rlv_megatron.rollout.restart import EngineDied
from rlv_megatron.rollout.weight_stream import stream_weights
from rlv_megatron.eval.equivalence import AnswerKeys
from rlv_megatron.eval.sampling import evaluate
from rlv_megatron.plan import total_params
from rlv_megatron.eval.scaling import verifier_quality
from rlv_megatron.train import checkpoint, offload
from rlv_megatron.train.packing import computed_tokens
from rlv_megatron.train.preempt import Preempted, SigtermWatch
from rlv_megatron.train.seeds import step_seed
from rlv_megatron.train.step import rl_objective, score
from rlv_megatron.train.batch import SequenceBatch, build_sequences, verifier_selection


@dataclass
class Rollouts:
    """One replica's share of a step, built on its engine rank and shared with its other ranks."""
    batch: SequenceBatch
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B]
    stats: dict
    times: dict  # seconds per phase (rollout, reward) of the generation


def collect_rollouts(step, engine, task, fmt, cfg, place: Placement, version: int | None = None,
                     pool: PartialRollouts | None = None) -> Rollouts:
    """rollout -> reward -> advantages -> verifier batch, for this replica's prompts (engine rank only), by
    the engine's weights `version` (the step's own when None); `pool`: partial rollouts (rollout/partial.py)."""
    a = cfg.algo
    version = step if version is None else version
    metrics = Metrics(None)  # its own phase times: under overlap it runs beside the step that trains
    with metrics.timer("rollout"):
        if pool is not None:
            problems, prompts, outs, gen_stats = partial_groups(step, version, pool, engine, task, fmt, cfg, place)
        else:
            problems, prompts, outs, gen_stats = whole_groups(step, engine, task, fmt, cfg, place)
    flat = [(i, s) for i, group in enumerate(outs) for s in group]
    with metrics.timer("reward"):
        texts = [fmt.decode(s.token_ids) for _, s in flat]
        rewards, grade_stats = task.grade(texts, [problems[i].answer for i, _ in flat])
    group_ids = torch.tensor([i for i, _ in flat])
    r = torch.tensor(rewards, dtype=torch.float32)
    adv = compute_advantages(a.advantage, r, group_ids, a.adv_eps)  # graded on the host: the PyTorch path
    rng = random.Random(step_seed(cfg.train.seed, step, -2 - place.dp_rank))  # verifier example selection
    batch = build_sequences(fmt, [prompts[i] for i, _ in flat], [s.token_ids for _, s in flat], rewards,
                            adv.tolist(), verifier_selection(rewards, cfg.verifier.examples, rng),
                            task.tokenizer.pad_token_id, rollout_logps=[s.logprobs for _, s in flat],
                            verify_turn=cfg.verifier.lam > 0 or cfg.verifier.monitor)
    lengths = [len(s.token_ids) for _, s in flat]
    lags = [step - v for _, s in flat for v in (s.versions or [version] * len(s.token_ids))]
    stats = {**gen_stats, "rollout/token_lag_mean": sum(lags) / max(len(lags), 1),
             "rollout/token_lag_max": max(lags, default=0),
             "grader/timeouts": grade_stats.get("timeouts", 0), "grader/errors": grade_stats.get("errors", 0),
             "rollout/engine_restarts": getattr(engine, "restarts", 0),  # over the run (rollout/restart.py)
             "response/length_mean": sum(lengths) / len(lengths), "response/length_max": max(lengths),
             "response/length_min": min(lengths),
             "response/truncated_fraction": sum(s.finish_reason == "length" for _, s in flat) / len(flat),
             "throughput/generated_tokens": sum(lengths),
             "throughput/rollout_tokens": sum(lengths) + sum(len(p) for p in prompts) * a.group_size}
    return Rollouts(batch, r, group_ids, stats, dict(metrics.times))


def whole_groups(step, engine, task, fmt, cfg, place: Placement):
    """The step's prompts, each sample generated to its end: (problems, prompt ids, samples per prompt, {})."""
    a = cfg.algo
    problems = task.sample_train(a.prompts_per_step, seed=step_seed(cfg.train.seed, step, 0))
    first = place.dp_rank * (a.prompts_per_step // place.dp_size)  # global index of my first prompt
    problems = my_share(problems, place)
    prompts = [fmt.prompt_ids(p.prompt) for p in problems]
    outs = engine.generate(prompts, n=a.group_size, temperature=a.temperature, top_p=a.top_p,
                           max_tokens=a.max_tokens, min_tokens=a.min_tokens, stop_token_ids=[fmt.eos_id],
                           seeds=[step_seed(cfg.train.seed, step, first + i) for i in range(len(prompts))])
    return problems, prompts, outs, {}


def rl_step(step, policy, engine, task, fmt, cfg, metrics, place: Placement = Placement(),
            ahead: RolloutsAhead | None = None, pool: PartialRollouts | None = None) -> dict:
    """One step; `ahead` (rollout.mode=overlap): the rollouts were generated earlier, by weights `lag`
    updates older, and weights reach the engine at the start of a step (in `ahead.take`), not the end;
    `pool` (sync mode): the partial rollouts in progress (under overlap, `ahead` holds it)."""
    a = cfg.algo
    if ahead is None:
        ro = collect_rollouts(step, engine, task, fmt, cfg, place, pool=pool) if place.owns_engine else None
        version, sync = step, None
        if place.owns_engine:
            engine.sleep()  # rollout.enable_sleep_mode: its GPU memory is training's until the sync wakes it
    else:
        with metrics.timer("rollout_wait"):  # the trainer idle, waiting for the generation (and the sync)
            ro, version, sync = ahead.take(step)
    ro = share_from_engine(ro, place)
    if ahead is None:  # the engine rank put it to sleep before sharing: training's state back on the GPU
        offload.after_generation(policy)
    for phase, seconds in ro.times.items():
        metrics.times[phase] += seconds
    batch, r, group_ids = ro.batch, ro.rewards, ro.group_ids
    from_forward = old_logprobs_from_forward(a)
    with metrics.timer("train"):
        with metrics.timer("score"):
            old_logp = p_yes = ref_logp = None
            if not from_forward:
                old_logp, p_yes = score(policy.chunks, batch, policy.vocab, a.temperature, fmt.yes_id,
                                        fmt.score_no_id, cfg.train, policy.groups)
            if policy.reference is not None:
                ref_logp = score(policy.reference, batch, policy.vocab, a.temperature, fmt.yes_id, None,
                                 cfg.train, policy.groups)[0]
        keep = informative_groups(r, group_ids) if a.filter_equal_reward_groups else torch.ones_like(r, dtype=bool)
        # all-equal groups carry no policy gradient but still teach the verifier
        batch.policy_mask &= keep[:, None]
        train_stats, trained = {}, 0
        order = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, -1))  # same on every rank
        for _ in range(a.ppo_epochs):
            for idx in torch.randperm(len(batch), generator=order).chunk(a.ppo_minibatches):
                sub, outputs = batch.select(idx), {}
                trained += computed_tokens(sub, cfg.train)
                train_stats = policy.train_step(sub, rl_objective(
                    sub, None if from_forward else old_logp[idx], a, cfg.verifier, policy.vocab, fmt.yes_id,
                    fmt.no_id, None if ref_logp is None else ref_logp[idx], policy.groups.dp, fmt.score_no_id),
                    timer=metrics.timer, outputs=outputs)
                if from_forward:  # the one update's own log-probs and scores, back in rollout order
                    old_logp, scores = torch.zeros_like(outputs["logp"]), torch.zeros_like(outputs["score"])
                    old_logp[idx], scores[idx] = outputs["logp"], outputs["score"]
                    p_yes = scores[torch.arange(len(batch)), batch.verify_pos]
    if ahead is None:
        with at_boundary(None):  # trained: mid-step
            sync = sync_weights(policy, engine, place, metrics)
    m = batch.response_mask
    gap = ((old_logp - batch.rollout_logp).abs() * m).sum() / m.sum().clamp(min=1)
    verifier_stats = verifier_quality(p_yes.tolist(), [x >= 1.0 for x in r.tolist()], group_ids.tolist()) \
        if bool(batch.has_verify.all()) else {}
    rollout_stats = dp_mean({"reward/mean": r.mean().item(), "reward/informative_groups": keep.float().mean().item(),
                             "policy/train_rollout_logprob_gap": gap.item(), **ro.stats,
                             "throughput/sequence_tokens": (batch.verify_pos + 1).sum().item(),  # one pass
                             # what forward passes computed (shared prompts once): FLOPs count these
                             "throughput/trained_tokens": trained,
                             "throughput/scored_tokens": computed_tokens(batch, cfg.train),
                             **verifier_stats}, place)
    return {**rollout_stats, "reward/pass@1": rollout_stats["reward/mean"], **(sync or {"sync/seconds": 0.0,
            "sync/gb": 0.0}), "rollout/policy_lag": float(step - version), **train_stats,
            "response/lengths": batch.response_mask.sum(1).tolist()}  # this replica's, for the histogram


def sync_weights(policy, engine, place: Placement, metrics) -> dict:
    """The trainer's weights to the engine (collective over the model-parallel group). An engine that died
    as the run stops (SIGTERM) gets none: the step is done, and the checkpoint after it is what matters."""
    try:
        return _sync_weights(policy, engine, place, metrics)
    except EngineDied as e:
        if not e.stopping:
            raise
        return {"sync/seconds": 0.0, "sync/gb": 0.0}


def _sync_weights(policy, engine, place: Placement, metrics) -> dict:
    with metrics.timer("sync"):
        offload.before_generation(policy)  # every rank: the GPUs of the engine about to wake (train/offload.py)
        if place.owns_engine:
            engine.wake_up()  # asleep during a sync-mode step's training (rollout.enable_sleep_mode)
        weights = stream_weights(policy, place)
        if not place.owns_engine:
            drain(weights)
            return {"sync/seconds": 0.0, "sync/gb": 0.0}
        sync = engine.update_weights(weights)
        return {"sync/seconds": sync.seconds, "sync/gb": sync.bytes / 1e9}


def old_logprobs_from_forward(algo) -> bool:
    """algo.old_logprobs: whether the PPO ratio's denominator is the training forward's own detached log-probs
    (one update per batch: the same values a scoring pass would compute, without the pass)."""
    one_update = algo.ppo_epochs * algo.ppo_minibatches == 1
    return algo.old_logprobs == "current" or (algo.old_logprobs == "auto" and one_update)


def drain(iterator) -> float:
    """Drive an iterator's collectives on a rank that does not consume it; returns 0.0 (no sync time)."""
    for _ in iterator:
        pass
    return 0.0


def train(policy, engine, task, fmt, cfg, metrics, out_dir: Path, start_step: int = 0,
          resumed: tuple[Path, dict] | None = None, sigterm: SigtermWatch | None = None) -> list[dict]:
    """RL steps start_step..train.steps-1; every step is a function of (seed, step, weights, optimizer) and,
    under overlap, of the rollouts in flight, which the checkpoint keeps (`resumed`: its path and run state),
    so a run resumed from the checkpoint after step k repeats the uninterrupted run exactly. `sigterm`: after
    SIGTERM, the run stops at the next step boundary with a checkpoint (train/preempt.py)."""
    evals = []
    place = Placement.current()
    lead = place.owns_engine and place.dp_rank == 0  # global rank 0: logs and evaluates
    gpus = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    peak = dashboards.peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    params = total_params(policy.arch)
    scoring_passes = (not old_logprobs_from_forward(cfg.algo)) + (policy.reference is not None)
    pool = partial_pool(cfg, place, resumed)
    ahead = start_overlap(policy, engine, task, fmt, cfg, place, start_step, metrics, resumed, pool)
    sigterm = sigterm or SigtermWatch(cfg.train.sigterm_grace_s)  # not installed: never due
    sigterm.in_steps = True
    try:
        for step in tqdm(range(start_step, cfg.train.steps), desc="rl", mininterval=5,
                         initial=start_step, total=cfg.train.steps, disable=not lead):
            try:
                evals += train_one(step, policy, engine, task, fmt, cfg, metrics, out_dir, place, (ahead, pool),
                                   (params, scoring_passes, gpus, peak))
            except EngineDied as e:
                note = checkpoint_after_death(e, policy, cfg, out_dir, place, (ahead, pool))
                if e.stopping:
                    raise Preempted(f"preempted (SIGTERM) in RL step {step}, the engine gone: {note}") from e
                e.note = "; " + note
                raise
            if sigterm.due():
                saved = checkpoint_at(step + 1, policy, cfg, out_dir, place, (ahead, pool))
                raise Preempted(f"preempted (SIGTERM) after RL step {step}: {saved}")
    finally:
        sigterm.stop_steps()
        if ahead is not None:
            ahead.close()
    return evals


def checkpoint_at(step: int, policy, cfg, out_dir: Path, place: Placement, sources) -> str:
    """A checkpoint after `step` RL steps (unless it is the newest already); says how the run resumes."""
    latest = checkpoint.latest(out_dir / "checkpoints")
    if latest is None or checkpoint.verify(latest)["step"] != step:
        latest = save_checkpoint(step, policy, cfg, out_dir, place, sources)
    if latest is None:
        return "no checkpoint (train.keep_checkpoints=0): the same command starts over"
    return f"checkpoint {latest} saved: the same command resumes at RL step {step}"


def checkpoint_after_death(e: EngineDied, policy, cfg, out_dir: Path, place: Placement, sources) -> str:
    """After the engine died for good: a checkpoint where the policy is at a step boundary and this process
    alone can write one; how the run resumes."""
    if e.boundary is not None and not torch.distributed.is_initialized():
        return checkpoint_at(e.boundary, policy, cfg, out_dir, place, sources)
    latest = checkpoint.latest(out_dir / "checkpoints")
    if latest is None:
        return "no checkpoint yet: the same command starts over"
    return f"the same command resumes from {latest}, at RL step {checkpoint.verify(latest)['step']}"


def partial_pool(cfg, place: Placement, resumed) -> PartialRollouts | None:
    """rollout.max_step_tokens > 0: the engine rank's pool of groups in progress, as the checkpoint resumed
    from left it."""
    if not cfg.rollout.max_step_tokens or not place.owns_engine:
        return None
    pool = PartialRollouts(cfg.rollout.max_step_tokens, cfg.train.seed)
    if resumed is not None and resumed[1].get("partial_pool"):
        pool.load(checkpoint.load_extra(resumed[0], pool_name(place)))
    return pool


def start_overlap(policy, engine, task, fmt, cfg, place, start_step, metrics, resumed,
                  pool: PartialRollouts | None = None) -> RolloutsAhead | None:
    """rollout.mode=overlap: the generator of rollouts ahead (its pending steps restored from the checkpoint
    resumed from), and on CPU the trainer on the cores the engine does not take (config.engine_cores)."""
    if cfg.rollout.mode != "overlap":
        return None
    if not torch.cuda.is_available() and cfg.rollout.cpu_threads_bind == "all" and cfg.train.cpu_threads == 0:
        import os

        from rlv_megatron.config import engine_cores, usable_cores

        mine = sorted(set(usable_cores()) - set(engine_cores(cfg.rollout))) or usable_cores()
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(max(len(mine) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1))
    ahead = RolloutsAhead(lambda step, version: collect_rollouts(step, engine, task, fmt, cfg, place, version, pool),
                          lambda: sync_weights(policy, engine, place, metrics), cfg.rollout.max_staleness,
                          cfg.train.steps - 1, start_step, place.owns_engine)
    if resumed is not None:
        path, run_state = resumed
        versions = run_state.get("inflight", {})
        rollouts = checkpoint.load_extra(path, inflight_name(place)) if place.owns_engine and versions else {}
        ahead.restore({int(s): (rollouts.get(int(s)), v) for s, v in versions.items()})
    return ahead


def inflight_name(place: Placement) -> str:
    return f"inflight_dp{place.dp_rank}"


def pool_name(place: Placement) -> str:
    return f"partial_dp{place.dp_rank}"


def train_one(step, policy, engine, task, fmt, cfg, metrics, out_dir, place, sources, flops_args) -> list[dict]:
    """One RL step with its logging, evaluation and checkpoint; returns the evaluation run after it, if any.
    `sources`: (rollouts ahead under overlap, partial-rollout pool), either None."""
    params, scoring_passes, gpus, peak = flops_args
    ahead, pool = sources
    lead = place.owns_engine and place.dp_rank == 0
    t0 = time.perf_counter()
    # sync mode: the rollouts come before training (but they change a partial-rollout pool as they go)
    with at_boundary(step if ahead is None and pool is None else None):
        values = rl_step(step, policy, engine, task, fmt, cfg, metrics, place, ahead, None if ahead else pool)
    step_s = time.perf_counter() - t0
    lengths = values.pop("response/lengths")
    values.update(dashboards.step_throughput(values, metrics.times, step_s, params, cfg.algo.ppo_epochs,
                                             scoring_passes, place.dp_size, gpus, peak))
    generating = metrics.times.get("rollout", 0.0) + metrics.times.get("reward", 0.0)
    # idle: waiting for rollouts (under overlap, less the weight sync that happens inside the wait)
    waiting = metrics.times.get("rollout_wait", 0.0) - metrics.times.get("sync", 0.0) if ahead is not None \
        else generating
    values["overlap/trainer_idle_fraction"] = min(max(waiting, 0.0) / step_s, 1.0)
    values["overlap/engine_idle_fraction"] = max(1.0 - generating / step_s, 0.0)
    metrics.log(step, values)
    metrics.histogram("response/length", lengths, step)
    last = step == cfg.train.steps - 1
    evaluate_now = cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and not last
    if ahead is not None and (evaluate_now or last):  # evaluations (and the final one) see the newest weights
        ahead.settle(step + 1)
    with at_boundary(step + 1 if ahead is None else None):  # an engine that dies evaluating: trained, logged
        evals = [run_eval(step, engine, task, fmt, cfg, metrics, pool_scorer(policy, cfg))] \
            if lead and evaluate_now else []
    if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 or last:
        save_checkpoint(step + 1, policy, cfg, out_dir, place, sources)
    if last and cfg.train.export_final:
        policy.export(out_dir / "model", task.tokenizer, dtype=getattr(torch, cfg.model.params_dtype))
    return evals


def save_checkpoint(step: int, policy, cfg, out_dir: Path, place: Placement, sources) -> Path | None:
    """The run after `step` RL steps, with the rollouts in flight (overlap) and the partial-rollout pool that
    the steps after it need; None under train.keep_checkpoints=0."""
    ahead, pool = sources
    if not cfg.train.keep_checkpoints:
        return None
    inflight = ahead.inflight() if ahead is not None else {}  # waits for the generations in flight
    extras = {inflight_name(place): {s: ro for s, (ro, _) in inflight.items()}} \
        if inflight and place.owns_engine else {}
    if pool is not None:  # after the wait: no generation is changing it
        extras[pool_name(place)] = pool.state()
    return checkpoint.save(policy, out_dir / "checkpoints", step,
                           {"phase": "rl", "inflight": {str(s): v for s, (_, v) in inflight.items()},
                            "partial_pool": bool(cfg.rollout.max_step_tokens)}, cfg.train.keep_checkpoints, extras)


@contextlib.contextmanager
def at_boundary(step: int | None):
    """An engine that dies for good inside: the policy is at the start of RL step `step` (None: not at a step
    boundary), unless an inner block said otherwise."""
    try:
        yield
    except EngineDied as e:
        if not e.placed:
            e.boundary, e.placed = step, True
        raise


def pool_scorer(policy, cfg):
    """What scores an evaluation pool: the engine (None), or under verifier.kind=head the policy's own
    forward (vLLM cannot run a classification head)."""
    return policy if cfg.verifier.kind == "head" else None


def run_eval(step, engine, task, fmt, cfg, metrics, scorer=None) -> dict:
    with metrics.timer("eval"), AnswerKeys(cfg.task.grader_workers, cfg.task.grader_timeout_s) as keys:
        result, _ = evaluate(engine, fmt, task, task.eval, cfg.eval, cfg.algo.max_tokens, keys, scorer)
    metrics.log(step, {f"eval/{k}": v for k, v in result.items()})
    return {"step": step, **result}
