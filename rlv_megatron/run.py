"""One RL^V run from a typed config: warm start -> engine -> RL loop -> held-out evaluation -> outputs."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from rlv_megatron.config import Config
from rlv_megatron.models.hf_config import ModelArch


def scratch_arch(cfg: Config, vocab_size: int, tokenizer) -> ModelArch:
    m = cfg.model
    return ModelArch(family="qwen2", vocab_size=vocab_size, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                     num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                     head_dim=m.hidden_size // m.num_heads, norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=m.max_position_embeddings, qkv_bias=True, tie_word_embeddings=False,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def run(cfg: Config) -> Path | None:
    """The whole run on every rank (under torchrun or Slurm, one process per rank); returns the metrics path
    on global rank 0 and None elsewhere."""
    from rlv_megatron.evaluate import evaluate
    from rlv_megatron.metrics import Metrics
    from rlv_megatron.policy import Policy
    from rlv_megatron.rollout.colocate import Placement
    from rlv_megatron.rollout.engine import make_engine
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task
    from rlv_megatron.train import checkpoint
    from rlv_megatron.train.loop import run_eval, train
    from rlv_megatron.train.sft import warm_start
    from rlv_megatron import report

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # expected on CPU, and noise in a run's report: megatron's "TransformerEngine/Apex not installed"
    # fallbacks, numpy's note on flushed denormals
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    torch.set_flush_denormal(True)  # CPU steps slow down ~4x on denormals after a few dozen steps
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.train.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    task = make_task(cfg.task, cfg.verifier.question, cfg.eval.num_problems, seed=0, tokenizer_path=cfg.model.path)
    fmt = ChatFormat(task.tokenizer, cfg.verifier.question, two_way=cfg.verifier.loss == "yes_no")
    arch = None if cfg.model.path else scratch_arch(cfg, len(task.tokenizer), task.tokenizer)
    policy = Policy(cfg, arch)
    place = Placement.current()
    lead = place.owns_engine and place.dp_rank == 0  # global rank 0 logs, evaluates and writes the report
    metrics = Metrics(str(out / "tb"), str(out / "metrics.jsonl")) if lead else Metrics(None)
    results: dict = {}
    resume = checkpoint.latest(out / "checkpoints") if cfg.train.resume else None
    start_step = 0
    if resume is not None:
        if cfg.algo.kl_beta > 0:
            policy.freeze_reference()  # the structure; its weights come from the checkpoint
        start_step = checkpoint.load(policy, resume)["step"]
        if lead:
            print(f"resuming from {resume} (RL step {start_step})", flush=True)
    elif cfg.sft.steps > 0:
        with metrics.timer("sft"):
            results["sft"] = warm_start(policy, task, fmt, cfg, metrics)
    if cfg.algo.kl_beta > 0 and policy.reference is None:
        policy.freeze_reference()
    start = policy.export(out / "start", task.tokenizer)  # collective
    engine = make_engine("vllm", str(start), cfg.rollout) if place.owns_engine else None
    try:
        if cfg.eval.before_rl and lead:
            results["before_rl"] = run_eval(-1, engine, task, fmt, cfg, metrics)
        results["during_rl"] = train(policy, engine, task, fmt, cfg, metrics, out, start_step)
        if not lead:
            return None
        with metrics.timer("eval"):
            final, pool = evaluate(engine, fmt, task, task.eval, cfg.eval, cfg.algo.max_tokens)
        metrics.log(cfg.train.steps, {f"eval/{k}": v for k, v in final.items()})
    finally:
        if engine is not None:
            engine.close()
        metrics.close()
        task.close()
    with open(out / "pool.jsonl", "w") as f:
        for rows in pool:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    results.update(final=final, history=metrics.history, config=_plain(cfg))
    (out / "history.json").write_text(json.dumps(results, indent=1, default=str))
    report.plot(metrics.history, final, out / "curves.png")
    print(report.table(final))
    print(report.headline(final))
    path = out / "metrics.json"
    path.write_text(json.dumps(final, indent=2))
    return path


def _plain(cfg: Config) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
