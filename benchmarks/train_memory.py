"""Where the trainer's memory goes on the real SmolLM2-135M-Instruct: one RL train step (no engine) on the
shapes of the TRL comparison (8 GSM8K prompts through the chat template x 8 samples of exactly 64 random
tokens, fp32, 2 threads), at the config defaults unless --set says otherwise; lambda = 0 and 1.

Each configuration runs in its own process. Per phase it records the process's RSS (after the model, after
the optimizer's first step) and the step's peak (VmHWM), and beside it `rlv plan`'s estimate of the same
step; --profile adds torch.profiler's top operators by memory allocated for one more step.

Usage: python benchmarks/train_memory.py [--set train.micro_batch_tokens=1024] [--lams 0,1] [--profile]
Last line: `train_memory: X GiB step peak, xR of rlv plan`, for the last lambda of --lams (by default 1, the
default RL^V; BENCHMARKS.md's runs so far used --lams 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rl_step import _rss_gb, peak_rss_gb, reset_peak_rss  # noqa: E402


def configure(args):
    from rlv_megatron import assets
    from rlv_megatron.config import Config, apply_overrides

    cfg = Config()
    cfg.model.path = str(assets.model_dir("smollm2-135m-instruct"))
    cfg.task.name, cfg.task.train_path = "gsm8k", "gsm8k/train"
    cfg.algo.prompts_per_step, cfg.algo.group_size = args.prompts, args.group
    cfg.algo.max_tokens = cfg.algo.min_tokens = args.tokens
    cfg.rollout.dtype, cfg.rollout.max_model_len = "float32", 512
    cfg.train.cpu_threads = args.threads
    cfg.verifier.lam = args.lam
    apply_overrides(cfg, args.set or [])
    return cfg


def synthetic_batch(cfg, task, fmt):
    """The RL batch of one step with random responses (memory depends on shapes, not on what is said)."""
    import torch

    from rlv_megatron.algos.advantages import compute_advantages
    from rlv_megatron.train.batch import build_sequences

    problems = task.sample_train(cfg.algo.prompts_per_step, seed=0)
    G, L = cfg.algo.group_size, cfg.algo.max_tokens
    prompts = [fmt.prompt_ids(p.prompt) for p in problems for _ in range(G)]
    gen = torch.Generator().manual_seed(0)
    responses = [torch.randint(100, 40000, (L,), generator=gen).tolist() for _ in prompts]
    rewards = [float(i % 3 == 0) for i in range(len(prompts))]
    groups = torch.arange(len(problems)).repeat_interleave(G)
    adv = compute_advantages(cfg.algo.advantage, torch.tensor(rewards), groups, cfg.algo.adv_eps).tolist()
    lam = cfg.verifier.lam
    return build_sequences(fmt, prompts, responses, rewards, adv, [lam > 0] * len(prompts),
                           pad_id=task.tokenizer.pad_token_id, verify_turn=lam > 0 or cfg.verifier.monitor)


def worker(args) -> dict:
    import torch

    from rlv_megatron.plan import DEVICES, estimate
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task
    from rlv_megatron.train.packing import computed_tokens, lengths
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.train.step import rl_objective

    torch.set_flush_denormal(True)
    cfg = configure(args)
    task = make_task(cfg.task, cfg.verifier.question, 0, seed=0, tokenizer_path=cfg.model.path)
    fmt = ChatFormat.for_config(task.tokenizer, cfg)
    batch = synthetic_batch(cfg, task, fmt)
    rss = {"before_model": _rss_gb()}
    policy = Policy(cfg)
    rss["model"] = _rss_gb()
    plan = estimate(cfg, policy.arch, DEVICES["cpu"], world_size=1)

    def step():
        objective = rl_objective(batch, None, cfg.algo, cfg.verifier, policy.vocab, fmt.yes_id, fmt.no_id)
        return policy.train_step(batch, objective)

    step()  # the optimizer's states are created here
    rss["after_first_step"] = _rss_gb()
    reset_peak_rss()
    t0 = time.perf_counter()
    stats = step()
    seconds = time.perf_counter() - t0
    rss["step_peak"] = peak_rss_gb()
    rss["after_step"] = _rss_gb()
    top = ""
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        top = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=12)
    task.close()
    return {"rss_gb": rss, "plan_gib": {k: v / 2**30 for k, v in plan.memory.items()},
            "plan_total_gb": plan.total / 2**30, "sequences": len(batch), "sequence_tokens": sum(lengths(batch)),
            "computed_tokens": computed_tokens(batch, cfg.train),
            "micro_batches": stats["train/micro_batches"], "profile": top, "step_s": seconds,
            "config": {"micro_batch_tokens": cfg.train.micro_batch_tokens, "pack": cfg.train.pack,
                       "share_prompts": cfg.train.share_prompts}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lams", default="0,1")
    ap.add_argument("--set", action="append", help="a config override, e.g. train.micro_batch_tokens=1024")
    ap.add_argument("--profile", action="store_true", help="print the top operators by memory of one step")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lam", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    base = [sys.executable, __file__, "--worker", "--prompts", str(args.prompts), "--group", str(args.group),
            "--tokens", str(args.tokens), "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
    for item in args.set or []:
        base += ["--set", item]
    last = None
    for lam in [float(x) for x in args.lams.split(",")]:
        done = subprocess.run(base + ["--lam", str(lam)], capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"train_memory: lambda = {lam:g} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        r = json.loads(lines[-1][len("RESULT "):])
        rss, above = r["rss_gb"], r["rss_gb"]["step_peak"] - r["rss_gb"]["before_model"]
        terms = ", ".join(f"{k} {v:.2f}" for k, v in r["plan_gib"].items())
        print(f"lambda = {lam:g}, {r['config']}: {r['sequences']} sequences, {r['sequence_tokens']} sequence / "
              f"{r['computed_tokens']} computed tokens in {r['micro_batches']:.0f} micro-batches, step "
              f"{r['step_s']:.1f} s | RSS GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in rss.items())
              + f" | plan {r['plan_total_gb']:.2f} GiB ({terms}) = x{r['plan_total_gb'] / above:.2f} of the peak "
              "above the pre-model RSS", flush=True)
        if r["profile"]:
            print(r["profile"], flush=True)
        last = (rss["step_peak"], r["plan_total_gb"] / above)
    print(f"train_memory: {last[0]:.2f} GiB step peak, x{last[1]:.2f} of rlv plan")


if __name__ == "__main__":
    main()
