"""One RL step on the real SmolLM2-135M-Instruct (from `rlv fetch`) against the plain eager baseline, on the
same work: N prompts x G samples of exactly L new tokens (fixed length on both sides), fp32, the same threads,
the same GSM8K prompts through the model's chat template, GRPO with one update per batch. Our trainer runs
unpacked micro-batches of 1024 tokens, each prompt computed once for its samples (train.pack=false,
train.micro_batch_tokens=1024, train.share_prompts=true; --set overrides, e.g. train.share_prompts=false).

    ours  : rlv_megatron.train.loop.rl_step (vLLM rollout, grading, Megatron forward/backward + Adam, sync)
    eager : transformers `generate` + grading + a transformers forward/backward over the same sequences in
            micro-batches of 8 (log-probs of the completion tokens only, as TRL computes them) + torch AdamW: the work every simple
            trainer (TRL's GRPOTrainer) does per step

Each side runs in its own process (peak RSS is per process), 1 warm-up step and --steps timed ones; ours at
lambda = 0 (the same method as the baseline: the headline) and lambda = 1 (RL^V: also the verifier loss).
Completion tokens/s = completion tokens / wall-clock step time. Training tokens/s = tokens trained / time of
forward+backward+optimizer. MFU = 6 x params x tokens computed (a shared prompt counts once) / that time,
over a large fp32 matmul's FLOP/s measured in the same process.

Usage: python benchmarks/rl_step.py [--steps 5] [--profile out.txt]   (last line: the headline ratio)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_gb(pid: str = "self") -> float:
    """VmHWM: the process's peak resident set since it started (or since reset_peak_rss)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS


def matmul_flops(threads: int, n: int = 2048, reps: int = 8, trials: int = 5) -> float:
    """fp32 FLOP/s of an n x n matmul, best of `trials` (this machine is shared): the practical peak for MFU."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def setup_task(args):
    from rlv_megatron import assets
    from rlv_megatron.config import Config
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task

    cfg = Config()
    cfg.model.path = str(assets.model_dir("smollm2-135m-instruct"))
    cfg.task.name, cfg.task.train_path = "gsm8k", "gsm8k/train"
    a = cfg.algo
    a.prompts_per_step, a.group_size, a.max_tokens, a.min_tokens = args.prompts, args.group, args.tokens, args.tokens
    a.temperature, a.filter_equal_reward_groups = 1.0, False  # every sequence is trained on both sides
    cfg.optim.lr = 1e-6
    cfg.rollout.dtype, cfg.rollout.max_model_len = "float32", 512
    cfg.train.cpu_threads, cfg.train.keep_checkpoints, cfg.eval.final, cfg.sft.steps = args.threads, 0, False, 0
    cfg.verifier.lam = args.lam
    # one sequence per row (SDPA's causal kernel, no mask) in micro-batches of 1024 tokens: the trainer's
    # activations stay below the eager baseline's (micro-batches of 8 sequences, ~1,200 tokens)
    cfg.train.pack, cfg.train.micro_batch_tokens = False, 1024
    cfg.train.share_prompts = True  # each prompt computed once for its G samples (same loss and gradients)
    for item in args.set or []:
        from rlv_megatron.config import apply_overrides

        apply_overrides(cfg, [item])
    task = make_task(cfg.task, cfg.verifier.question, 0, seed=0, tokenizer_path=cfg.model.path)
    return cfg, task, ChatFormat.for_config(task.tokenizer, cfg)


def prompts_of(step, task, fmt, cfg):
    from rlv_megatron.train.seeds import step_seed

    problems = task.sample_train(cfg.algo.prompts_per_step, seed=step_seed(cfg.train.seed, step, 0))
    return problems, [fmt.prompt_ids(p.prompt) for p in problems]


def child_peaks_gb() -> float:
    import psutil

    return max((peak_rss_gb(str(c.pid)) for c in psutil.Process().children(recursive=True)), default=0.0)


def run_ours(args) -> dict:
    import torch

    from rlv_megatron.dashboards import Metrics
    from rlv_megatron.plan import total_params
    from rlv_megatron.train.policy import Policy
    from rlv_megatron.rollout.engine import make_engine
    from rlv_megatron.train.loop import rl_step

    torch.set_flush_denormal(True)
    from rlv_megatron.plan import DEVICES, estimate

    cfg, task, fmt = setup_task(args)
    base_gb = _rss_gb()
    policy = Policy(cfg)
    plan_gb = estimate(cfg, policy.arch, DEVICES["cpu"], world_size=1).total / 2**30
    tmp = tempfile.mkdtemp(prefix="rl_step_")
    start = policy.export(Path(tmp) / "start", task.tokenizer)
    engine = make_engine("vllm", str(start), cfg.rollout)
    metrics = Metrics(None)
    steps = []
    try:
        for step in range(1 + args.steps + bool(args.profile)):
            profiling = args.profile and step == 1 + args.steps  # an extra, untimed step
            prof = _profiler() if profiling else None
            reset_peak_rss()
            t0 = time.perf_counter()
            if prof is not None:
                with prof:
                    values = rl_step(step, policy, engine, task, fmt, cfg, metrics)
            else:
                values = rl_step(step, policy, engine, task, fmt, cfg, metrics)
            wall = time.perf_counter() - t0
            row = {"wall": wall, "peak_gb": peak_rss_gb(), **{k: v for k, v in metrics.times.items()},
                   "completion_tokens": values["throughput/generated_tokens"],
                   "train_tokens": values["throughput/sequence_tokens"],
                   "computed_tokens": values["throughput/trained_tokens"], "reward": values["reward/mean"]}
            metrics.times.clear()
            if not profiling:
                steps.append(row)
            if prof is not None:
                _write_profile(prof, args.profile, f"ours, lambda = {args.lam}")
        engine_peak = child_peaks_gb()
        mm = matmul_flops(args.threads)
    finally:
        engine.close()
        task.close()
    return {"side": "ours", "steps": steps[1:], "warmup": steps[0], "trainer_peak_gb": peak_rss_gb(),
            "engine_peak_gb": engine_peak, "params": total_params(policy.arch), "matmul_flops": mm,
            "base_gb": base_gb, "plan_gb": plan_gb}


def run_eager(args) -> dict:
    import torch
    import transformers

    from rlv_megatron.algos.advantages import compute_advantages

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    cfg, task, fmt = setup_task(args)
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=0.0)
    pad = task.tokenizer.pad_token_id
    G, L = cfg.algo.group_size, cfg.algo.max_tokens
    steps = []
    for step in range(1 + args.steps):
        problems, prompts = prompts_of(step, task, fmt, cfg)
        reset_peak_rss()
        times = {}
        t0 = time.perf_counter()
        P = max(map(len, prompts))
        ids = torch.full((len(prompts), P), pad)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded, as generate expects
            ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
        torch.manual_seed(step)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=L, min_new_tokens=L, num_return_sequences=G,
                                 pad_token_id=pad)
        t1 = time.perf_counter()
        completions = out[:, P:]
        answers = [p.answer for p in problems for _ in range(G)]
        rewards, _ = task.grade([fmt.decode(c.tolist()) for c in completions], answers)
        r = torch.tensor(rewards)
        adv = compute_advantages("grpo", r, torch.arange(len(prompts)).repeat_interleave(G), cfg.algo.adv_eps)
        t2 = time.perf_counter()
        full_mask = torch.cat([mask.repeat_interleave(G, 0), torch.ones_like(completions)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        for rows in torch.arange(len(out)).split(args.eager_micro_batch):  # gradient accumulation, as TRL
            logits = model(input_ids=out[rows], attention_mask=full_mask[rows], position_ids=positions[rows],
                           logits_to_keep=L + 1).logits[:, :-1]  # completion positions only
            logp = torch.log_softmax(logits.float() / cfg.algo.temperature, -1).gather(
                -1, completions[rows, :, None])[..., 0]
            ratio = (logp - logp.detach()).exp()  # one update per batch: old = current, the ratio is exactly 1
            loss = -(ratio * adv[rows, None]).sum() / completions.numel()
            loss.backward()
            del logits, logp, ratio, loss
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        times = {"rollout": t1 - t0, "reward": t2 - t1, "forward_backward": t3 - t2, "optimizer": t4 - t3}
        steps.append({"wall": t4 - t0, "peak_gb": peak_rss_gb(), **times, "completion_tokens": completions.numel(),
                      "train_tokens": int(full_mask.sum()), "computed_tokens": int(full_mask.sum()),
                      "reward": r.mean().item()})
    task.close()
    mm = matmul_flops(args.threads)
    return {"side": "eager", "steps": steps[1:], "warmup": steps[0], "trainer_peak_gb": peak_rss_gb(),
            "engine_peak_gb": 0.0, "params": sum(p.numel() for p in model.parameters()), "matmul_flops": mm}


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


def _write_profile(prof, path, title) -> None:
    ka = prof.key_averages()
    phases = ("rollout", "reward", "score", "train", "forward_backward", "optimizer", "sync")
    rows = [f"{e.key}: {e.cpu_time_total / 1e6:.2f} s" for e in ka if e.key in phases]
    with open(path, "a") as f:
        f.write(f"## {title}\n\nphases (wall, trainer process): {'; '.join(rows)}\n\n")
        f.write("top 10 by self CPU time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=10) + "\n")
        f.write("top 10 by self CPU memory\n" + ka.table(sort_by="self_cpu_memory_usage", row_limit=10) + "\n")


def summarize(res: dict) -> dict:
    s = res["steps"]
    med = lambda k: statistics.median(x.get(k, 0.0) for x in s)  # noqa: E731
    train_s = med("forward_backward") + med("optimizer")
    tokens = med("train_tokens")
    return {"wall_s": med("wall"), "rollout_s": med("rollout"), "reward_s": med("reward"), "score_s": med("score"),
            "forward_backward_s": med("forward_backward"), "optimizer_s": med("optimizer"), "sync_s": med("sync"),
            "completion_tokens": med("completion_tokens"), "train_tokens": tokens,
            "completion_tok_s": med("completion_tokens") / med("wall"), "train_tok_s": tokens / train_s,
            "fb_ms_per_token": 1e3 * med("forward_backward") / tokens,
            "computed_tokens": med("computed_tokens"),
            "mfu": 6 * res["params"] * med("computed_tokens") / train_s / res["matmul_flops"],
            "matmul_gflops": res["matmul_flops"] / 1e9, "trainer_peak_gb": res["trainer_peak_gb"],
            "engine_peak_gb": res["engine_peak_gb"], "step_peak_gb": max(x["peak_gb"] for x in s),
            "trend_s": [round(x["wall"], 2) for x in s],
            "plan_ratio": res["plan_gb"] / (max(x["peak_gb"] for x in s) - res["base_gb"]) if "plan_gb" in res else None}


def row(name: str, m: dict) -> str:
    return (f"{name:<14} step {m['wall_s']:6.2f} s | rollout {m['rollout_s']:.2f} reward {m['reward_s']:.2f} "
            f"score {m['score_s']:.2f} fwd+bwd {m['forward_backward_s']:.2f} optim {m['optimizer_s']:.2f} "
            f"sync {m['sync_s']:.2f} | {m['completion_tok_s']:.1f} completion tok/s, {m['train_tok_s']:.0f} "
            f"train tok/s ({m['train_tokens']:.0f} tokens, {m['computed_tokens']:.0f} computed, "
            f"{m['fb_ms_per_token']:.2f} ms/token fwd+bwd), "
            f"MFU {m['mfu']:.0%} of {m['matmul_gflops']:.0f} GFLOP/s | peak RSS trainer "
            f"{m['trainer_peak_gb']:.2f} GB (in steps {m['step_peak_gb']:.2f}), engine {m['engine_peak_gb']:.2f} GB"
            f" | step times {m['trend_s']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager-micro-batch", type=int, default=8, help="sequences per eager forward/backward "
                    "(TRL's per_device_train_batch_size; the whole batch at once needs > 20 GB)")
    ap.add_argument("--lams", default="0,1", help="lambda values of our runs (the first is the headline)")
    ap.add_argument("--profile", help="append torch.profiler tables of one step per side to this file")
    ap.add_argument("--set", action="append", help="a config override for our side, e.g. train.pack=false")
    ap.add_argument("--worker", choices=("ours", "eager"), help=argparse.SUPPRESS)
    ap.add_argument("--lam", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = run_ours(args) if args.worker == "ours" else run_eager(args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    base = [sys.executable, __file__, "--steps", str(args.steps), "--prompts", str(args.prompts), "--group",
            str(args.group), "--tokens", str(args.tokens), "--threads", str(args.threads),
            "--eager-micro-batch", str(args.eager_micro_batch)]
    base += ["--profile", os.path.abspath(args.profile)] if args.profile else []
    for item in args.set or []:
        base += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_LOGGING_LEVEL": "ERROR",
           "TOKENIZERS_PARALLELISM": "false"}

    def child(*extra) -> dict:
        done = subprocess.run(base + list(extra), capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"rl_step: worker {extra} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(lines[-1][len("RESULT "):])

    eager = summarize(child("--worker", "eager"))
    print(row("HF eager", eager), flush=True)
    ours = {}
    for lam in [float(x) for x in args.lams.split(",")]:
        ours[lam] = summarize(child("--worker", "ours", "--lam", str(lam)))
        print(row(f"ours lam={lam:g}", ours[lam]) + f" | x{ours[lam]['completion_tok_s'] / eager['completion_tok_s']:.2f}"
              f" vs HF eager", flush=True)
    head = ours[next(iter(ours))]
    for lam, m in ours.items():
        print(f"rlv plan (lambda = {lam:g}): x{m['plan_ratio']:.2f} of the measured step peak above the pre-model RSS")
    print(f"training phase: x{head['train_tok_s'] / eager['train_tok_s']:.2f} of eager's tokens/s; trainer peak RSS "
          f"x{head['trainer_peak_gb'] / eager['trainer_peak_gb']:.2f} of eager's")
    print(f"rl_step: {head['completion_tok_s']:.1f} tokens/s, x{head['completion_tok_s'] / eager['completion_tok_s']:.2f}"
          " vs HF eager")


if __name__ == "__main__":
    main()
