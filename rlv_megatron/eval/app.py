"""`rlv eval` as a function: a pool sampled from a model (or read from a file) -> metrics -> outputs."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rlv_megatron.config import Config, ConfigError, validate
from rlv_megatron.eval.equivalence import AnswerKeys
from rlv_megatron.eval.metrics import pool_report
from rlv_megatron.eval.outputs import write_all
from rlv_megatron.eval.pool_io import read_pool, write_pool


class EvalError(RuntimeError):
    """A model path that is neither a Hugging Face directory nor a checkpoint, or a failed export."""


def resolve_model(path: str | Path, workdir: str | Path, model_dir: str | None = None, dtype: str = "float32") -> Path:
    """A Hugging Face directory as it is; a checkpoint (a step_* directory or a checkpoints/ root) exported into
    `workdir` by `rlv export` in a child process (Megatron's process group stays out of vLLM's process)."""
    from rlv_megatron.train.checkpoint import LATEST, MANIFEST

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not ((path / LATEST).is_file() or (path / MANIFEST).is_file()):
        raise EvalError(f"{path}: neither a Hugging Face model directory (config.json) nor a checkpoint "
                        f"({LATEST} or {MANIFEST})")
    out = Path(workdir) / "model"
    cmd = [sys.executable, "-m", "rlv_megatron.cli", "export", str(path), str(out), "--dtype", dtype]
    done = subprocess.run(cmd + (["--model", model_dir] if model_dir else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise EvalError(f"exporting checkpoint {path} failed:\n{done.stderr[-3000:]}")
    return out


def _check_lengths(cfg: Config, fmt, problems, budget: int) -> None:
    need = max(len(fmt.prompt_ids(p.prompt)) for p in problems) + budget + fmt.verify_turn_tokens
    if need > cfg.rollout.max_model_len:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len}: the longest prompt, a response of "
                          f"{budget} tokens and the verification turn need {need}")


def sample(cfg: Config, model: str, model_dir: str | None = None) -> dict[int, list[list[dict]]]:
    """Pools per budget (eval.budgets, default [algo.max_tokens]) from a vLLM engine on `model`."""
    from rlv_megatron.eval.sampling import sample_pools
    from rlv_megatron.rollout.engine import make_engine
    from rlv_megatron.rollout.restart import RestartingEngine
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    budgets = sorted(set(cfg.eval.budgets or [cfg.algo.max_tokens]))
    if budgets[0] < 1:
        raise ConfigError(f"eval.budgets={budgets}: must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        hf = resolve_model(model, tmp, model_dir, cfg.rollout.dtype)
        # evaluation never draws training problems: the eval file stands in for a missing train file
        task_cfg = dataclasses.replace(cfg.task, train_path=cfg.task.train_path or cfg.task.eval_path)
        task = make_task(task_cfg, cfg.verifier.question, cfg.eval.num_problems, seed=0, tokenizer_path=str(hf))
        engine = None
        try:
            fmt = ChatFormat.for_config(task.tokenizer, cfg)
            _check_lengths(cfg, fmt, task.eval, budgets[-1])
            scorer = head_scorer(cfg, hf)
            # a dead engine is replaced (rollout.max_restarts): the model directory holds the weights it needs
            engine = RestartingEngine(lambda: make_engine("vllm", str(hf), cfg.rollout), cfg.rollout.max_restarts)
            return sample_pools(engine, fmt, task, task.eval, cfg.eval, budgets, scorer)
        finally:
            if engine is not None:
                engine.close()
            task.close()


def head_scorer(cfg: Config, hf: Path):
    """A model exported with a classification head (verifier_head.pt, verifier.kind=head) is scored by its
    own forward in Megatron, which vLLM cannot do; None for the generative verifier (the engine scores)."""
    from rlv_megatron.models.verifier_head import HEAD_FILE
    from rlv_megatron.train.policy import Policy

    if not (hf / HEAD_FILE).is_file():
        return None
    head_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(hf)),
                                   verifier=dataclasses.replace(cfg.verifier, kind="head"))
    return Policy(head_cfg)


def run(cfg: Config, model: str | None = None, pool: str | None = None, baseline: str | None = None,
        out: str | None = None, model_dir: str | None = None) -> Path:
    """Sample a pool from `model` (written to out/pool.jsonl) or read `pool`, compute every metric (against
    `baseline`, a pool file, when given) and write the outputs under `out` (default eval.out_dir).
    Returns the path of metrics.json. Refused input (a bad file or config) leaves `out` as it was: nothing
    is created before every input is read and every metric computed, and a failure removes what this call
    created (a sampled pool.jsonl stays: it is the expensive part)."""
    if (model is None) == (pool is None):
        raise ConfigError("give a model (Hugging Face directory or checkpoint) or --pool FILE, not both")
    validate(cfg)
    kind = cfg.eval.score_kind
    if model is not None and kind != "probability":
        raise ConfigError(f"eval.score_kind={kind}: a pool sampled from a model is scored with its P(Yes), a "
                          "probability; the other kinds are for --pool files")
    out = Path(out or cfg.eval.out_dir)
    base = read_pool(baseline, kind) if baseline else None  # bad files fail before any sampling
    if pool is not None:
        pools = read_pool(pool, kind)
    else:
        pools = sample(cfg, model, model_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_pool(out / "pool.jsonl", pools)
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)  # the top new folder
    try:
        with AnswerKeys(cfg.task.grader_workers, cfg.task.grader_timeout_s, out / "answer_keys.json") as keys:
            report = pool_report(pools, cfg.eval, keys, base)
            out.mkdir(parents=True, exist_ok=True)
            keys.save()
        return write_all(report, out)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
