"""`rlv`: the command line. Subcommands stay thin; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def _cmd_demo(args) -> int:
    from rlv_megatron import demo

    demo.run(args.out, steps=args.steps, seed=args.seed)
    return 0


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
    h, f, L, v = arch.hidden_size, arch.ffn_hidden_size, arch.num_layers, arch.vocab_size
    qkv_rows = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
    qkv = qkv_rows * (h + (1 if arch.qkv_bias else 0))
    info["parameters"] = L * (qkv + arch.num_heads * arch.head_dim * h + 3 * h * f + 2 * h) + h + \
        v * h * (1 if arch.tie_word_embeddings else 2)
    print(json.dumps(info, indent=2))
    return 0


def _cmd_export(args) -> int:
    """A checkpoint (a step directory, or a checkpoints root: its latest) -> a Hugging Face directory."""
    from pathlib import Path

    from rlv_megatron.config import Config
    from rlv_megatron.policy import Policy
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
    policy = Policy(cfg)
    checkpoint.load(policy, step_dir, optimizer=False)
    tokenizer = None
    if (model_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    print(policy.export(args.out, tokenizer, dtype=getattr(__import__("torch"), args.dtype)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlv", description="RL^V on megatron-core + vLLM: the policy is its own verifier.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="foundation demo on CPU: Megatron policy, vLLM engine, weight sync, export")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--steps", type=int, default=40, help="training steps before the sync (default: 40)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)
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
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    e.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
