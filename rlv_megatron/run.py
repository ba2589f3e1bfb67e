"""One RL^V run from a typed config: warm start -> engine -> RL loop -> held-out evaluation -> outputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from rlv_megatron.config import Config, ConfigError, TaskConfig, validate
from rlv_megatron.models.hf_config import ModelArch, load_arch
from rlv_megatron.plan import settle

# what a run writes under train.out_dir (hydra/ is Hydra's own, written before the run starts)
OUTPUTS = ("checkpoints", "start", "model", "tb", "metrics.jsonl", "metrics.json", "history.json", "pool.jsonl",
           "curves.png")


def scratch_arch(cfg: Config, vocab_size: int, tokenizer) -> ModelArch:
    m = cfg.model
    return ModelArch(family="qwen2", vocab_size=vocab_size, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                     num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                     head_dim=m.hidden_size // m.num_heads, norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=m.max_position_embeddings, qkv_bias=True, tie_word_embeddings=False,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def evaluates(cfg: Config) -> bool:
    """Whether the run evaluates on held-out problems at all."""
    return cfg.eval.final or cfg.eval.before_rl or cfg.train.eval_every > 0


def task_config(cfg: Config) -> tuple[TaskConfig, int]:
    """The task config and held-out problem count the run builds its task with."""
    if evaluates(cfg):
        if cfg.task.name in ("math", "gsm8k") and cfg.task.eval_path is None:
            raise ConfigError(f"task.eval_path: required for task.name={cfg.task.name} to evaluate (eval.final, "
                              "eval.before_rl, train.eval_every); eval.final=false alone runs without one")
        return cfg.task, cfg.eval.num_problems
    return cfg.task, 0  # nothing held out, no eval file read


def announce(cfg: Config, out: Path) -> Path | None:
    """The checkpoint the run resumes from (None: it starts over), said on stderr before any long work.
    Starting over in a used out_dir removes its appended logs (metrics.jsonl, tb/) on global rank 0."""
    from rlv_megatron.train import checkpoint

    resume = checkpoint.latest(out / "checkpoints") if cfg.train.resume else None
    if int(os.environ.get("RANK", "0")) != 0:
        return resume
    if resume is not None:
        msg = (f"resuming from {resume} (RL step {checkpoint.verify(resume)['step']}): delete {out} or pass "
               "train.resume=false to start over")
    elif any((out / name).exists() for name in OUTPUTS):
        why = "no complete checkpoint" if cfg.train.resume else "train.resume=false"
        msg = f"{out} holds an earlier run's outputs ({why}): starting over, this run overwrites them"
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "tb", ignore_errors=True)
    else:
        return None
    print(f"rlv: {msg}", file=sys.stderr, flush=True)
    return resume


def run(cfg: Config) -> Path | None:
    """The whole run on every rank (under torchrun or Slurm, one process per rank); returns the metrics path
    on global rank 0 and None elsewhere. SIGTERM stops it with a checkpoint (train/preempt.py)."""
    from rlv_megatron.train.preempt import SigtermWatch

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # multiprocessing's resource tracker (a process started on first use, with these options) unlinks the
    # shared memory of an engine that was killed when the run ends; its note of each one is noise then
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    # expected on CPU, and noise in a run's report: megatron's "TransformerEngine/Apex not installed"
    # fallbacks, numpy's note on flushed denormals
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    # torch 2.11 deprecates names that megatron-core 0.16 (collectives, every step) and vLLM (reduce_op, at
    # import) use: nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\."
                            r"(reduce_scatter_tensor|all_gather_into_tensor|reduce_op)` is deprecated")
    sys.warnoptions.append("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")  # engine processes
    # said before vLLM configures its logging, so VLLM_LOGGING_LEVEL cannot quiet it: true of every CPU run
    logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
    # megatron's distributed optimizer zeroes grads through its shard views ("throws grad-access warning", its
    # zero_grad says); on CPU the warning points at cpu_compat, which only passes the call through
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor")
    torch.set_flush_denormal(True)  # CPU steps slow down ~4x on denormals after a few dozen steps
    torch.manual_seed(cfg.train.seed)
    validate(cfg)  # the architecture-free checks, before any work
    with SigtermWatch(cfg.train.sigterm_grace_s) as sigterm:
        return _run(cfg, sigterm)


def _run(cfg: Config, sigterm) -> Path | None:
    from rlv_megatron.eval.equivalence import AnswerKeys
    from rlv_megatron.eval.sampling import evaluate
    from rlv_megatron.dashboards import Metrics
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.rollout.placement import Placement, engine_devices
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task
    from rlv_megatron.train import checkpoint, offload
    from rlv_megatron.train.loop import pool_scorer, run_eval, train
    from rlv_megatron.train.sft import warm_start
    from rlv_megatron.eval import report

    task_cfg, num_eval = task_config(cfg)
    out = Path(cfg.train.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    task = make_task(task_cfg, cfg.verifier.question, num_eval, seed=0, tokenizer_path=cfg.model.path)
    engine = metrics = None
    try:  # the engine and the grader workers end with the run, however it ends
        fmt = ChatFormat.for_config(task.tokenizer, cfg)
        arch = load_arch(cfg.model.path) if cfg.model.path else scratch_arch(cfg, len(task.tokenizer), task.tokenizer)
        settle(cfg, arch)  # a config that cannot fit here is refused before an earlier run's outputs are touched
        resume = announce(cfg, out)
        policy = Policy(cfg, arch)
        place = Placement.current()
        lead = place.owns_engine and place.dp_rank == 0  # global rank 0 logs, evaluates and writes the report
        metrics = Metrics(str(out / "tb"), str(out / "metrics.jsonl")) if lead else Metrics(None)
        results: dict = {}
        start_step = 0
        if resume is not None:
            if cfg.algo.kl_beta > 0:
                policy.freeze_reference()  # the structure; its weights come from the checkpoint
            run_state = checkpoint.load(policy, resume)
            start_step = run_state["step"]
            if lead:
                print(f"resuming from {resume} (RL step {start_step})", flush=True)
        elif cfg.sft.steps > 0:
            t0 = time.perf_counter()
            results["sft"] = warm_start(policy, task, fmt, cfg, metrics)
            # its own record: a phase timer would be logged with RL step 0's phases
            metrics.log(cfg.sft.steps, {"sft/seconds": time.perf_counter() - t0})
        if cfg.algo.kl_beta > 0 and policy.reference is None:
            policy.freeze_reference()
        start = policy.export(out / "start", task.tokenizer, dtype=getattr(torch, cfg.model.params_dtype))
        devices = engine_devices(place, cfg.rollout)  # collective on GPU: each engine on its replica's GPUs
        # an SFT-only run, or one resumed with no RL step left, generates nothing: no engine (about 20 s on CPU)
        generates = start_step < cfg.train.steps or cfg.eval.before_rl or cfg.eval.final
        if generates:
            offload.before_generation(policy)  # every rank: the engine starts beside the weights (train/offload.py)
            engine = start_engine(cfg, start, devices, policy, place, sigterm) if place.owns_engine else None
        if cfg.eval.before_rl and lead:
            results["before_rl"] = run_eval(-1, engine, task, fmt, cfg, metrics, pool_scorer(policy, cfg))
        results["during_rl"] = train(policy, engine, task, fmt, cfg, metrics, out, start_step,
                                     None if resume is None else (resume, run_state), sigterm) if generates else []
        if not lead:
            return None
        final, pool = {}, []
        if cfg.eval.final:
            with metrics.timer("eval"), AnswerKeys(cfg.task.grader_workers, cfg.task.grader_timeout_s) as keys:
                final, pool = evaluate(engine, fmt, task, task.eval, cfg.eval, cfg.algo.max_tokens, keys,
                                       pool_scorer(policy, cfg))
            metrics.log(cfg.train.steps, {f"eval/{k}": v for k, v in final.items()})
    finally:
        if engine is not None:
            engine.close()
        if metrics is not None:
            metrics.close()
        task.close()
    if not cfg.train.keep_start:
        shutil.rmtree(start, ignore_errors=True)  # the engine read it at start-up and is closed
    if pool:
        with open(out / "pool.jsonl", "w") as f:
            for rows in pool:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    results.update(final=final, history=metrics.history, config=_plain(cfg))
    (out / "history.json").write_text(json.dumps(results, indent=1, default=str))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No artists with labels")  # no held-out curves
        report.plot(metrics.history, final, out / "curves.png")
    rl = [h for h in metrics.history if "reward/mean" in h]
    if final:
        print(report.table(final))
        print(report.headline(final))
    else:
        print("no final evaluation (eval.final=false)" +
              (f"; last RL step {rl[-1]['step']}: reward/mean {rl[-1]['reward/mean']:.3f}" if rl else ""))
    path = out / "metrics.json"
    # the held-out metrics; without a final evaluation, the last RL step's training metrics
    path.write_text(json.dumps(final or (rl[-1] if rl else {}), indent=2))
    return path


def start_engine(cfg: Config, start: Path, devices, policy, place, sigterm):
    """This replica's engine, replaced when it dies (rollout/restart.py) with the trainer's current weights.
    Only where the engine rank can stream those alone and they are the ones the engine had: sync mode, one
    rank per model replica. Elsewhere a death ends the run (max_restarts 0), and so does one after SIGTERM
    (Slurm signals every process of the step, the engine's too)."""
    from rlv_megatron.rollout.engine import make_engine
    from rlv_megatron.rollout.restart import RestartingEngine
    from rlv_megatron.rollout.weight_stream import stream_weights

    alone = cfg.parallel.tp == 1 and cfg.parallel.pp == 1 and cfg.rollout.mode == "sync"
    return RestartingEngine(lambda: make_engine("vllm", str(start), cfg.rollout, devices),
                            cfg.rollout.max_restarts if alone else 0,
                            lambda fresh: fresh.update_weights(stream_weights(policy, place)),
                            lambda: sigterm.requested)


def _plain(cfg: Config) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
