"""This project's RL step against TRL's GRPOTrainer on the same work (issue #31).

The work (issue #31's): the cached SmolLM2-135M-Instruct, 8 GSM8K prompts x 8 samples of exactly 64 new
tokens, fp32, 2 threads, GRPO with one update per batch, learning rate 1e-6.

- TRL: `GRPOTrainer` of trl==1.16.0, HF `generate`, eager forward/backward and AdamW, in micro-batches of
  32 sequences (2 accumulation steps per update), no reference model (beta = 0), activation checkpointing
  on (TRL's GRPOConfig default; issue #31 measured TRL with it off: --trl-no-checkpointing). It runs in a virtual
  environment of its own, `.cache/bench-venvs/trl`, created on first use with the project's torch and
  transformers pins; the project's `.venv` is not touched.
- ours: `benchmarks/rl_step.py`'s worker (vLLM rollout, grading, megatron forward/backward + Adam, weight
  sync) at the config defaults: `train.pack=true`, `train.share_prompts=true`, `train.micro_batch_tokens=auto`.
  It runs at lambda = 0 (the same method as TRL's: the headline) and lambda = 1 (RL^V, with the verifier loss).

Each run is its own process. Every run has 1 warm-up step and --steps timed ones, and the figure is their median.
Runs alternate (TRL, ours lambda 0, ours lambda 1) for --rounds rounds. Memory is the peak RSS (VmHWM) of
each side's largest process: TRL has one, ours has the trainer and the vLLM engine. Completion tokens/s is
64 x 64 completion tokens over the whole step's wall-clock time. Ours also prints the training phase's MFU:
6 x params x tokens computed over the forward+backward+optimizer time, as a fraction of a 2048^2 fp32
matmul's FLOP/s measured in the same process.

Usage: python benchmarks/vs_trl.py [--steps 3] [--rounds 2]
Last line: `vs_trl: X tokens/s, xR vs TRL GRPOTrainer (memory xM)` (ours at lambda = 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rl_step import peak_rss_gb, reset_peak_rss  # noqa: E402  (no project imports: TRL's venv too)

TRL_VENV = ROOT / ".cache" / "bench-venvs" / "trl"
TRL_PINS = ["trl==1.16.0", "transformers==5.19.0", "accelerate==1.16.0", "datasets==5.2.0", "psutil==7.2.2"]
TORCH_PIN = "torch==2.13.0"  # the local CPU wheel, first and exactly (scripts/setup.sh)


def trl_python() -> Path:
    """The benchmark venv's python, created with the pins on first use."""
    py = TRL_VENV / "bin" / "python"
    done = TRL_VENV / "pins.txt"
    if py.exists() and done.exists() and done.read_text().split() == [TORCH_PIN, *TRL_PINS]:
        return py
    print(f"vs_trl: creating {TRL_VENV} ({TORCH_PIN}, {' '.join(TRL_PINS)}; a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    for pins in ([TORCH_PIN], TRL_PINS):
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins], check=True)
    done.write_text(" ".join([TORCH_PIN, *TRL_PINS]) + "\n")
    return py


def write_prompts(path: Path, args) -> None:
    """The GSM8K problems of every step, as ours draws them (seeded per step), for TRL's dataset."""
    from benchmarks.rl_step import prompts_of, setup_task

    cfg, task, fmt = setup_task(argparse.Namespace(**{**vars(args), "lam": 0.0, "set": None}))
    rows = []
    for step in range(1 + args.steps):
        problems, _ = prompts_of(step, task, fmt, cfg)
        rows += [{"prompt": [{"role": "user", "content": p.prompt}], "answer": str(p.answer)} for p in problems]
    task.close()
    path.write_text(json.dumps({"rows": rows, "model": cfg.model.path}))


def run_trl(args) -> dict:
    """One TRL GRPOTrainer run in this (TRL's) environment: 1 + steps updates, a wall time and peak per step."""
    import re

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.prompts_file).read_text())

    def correct(completions, answer, **_):  # the last number of the completion against GSM8K's answer
        out = []
        for c, a in zip(completions, answer):
            text = c[-1]["content"] if isinstance(c, list) else c
            nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
            out.append(float(bool(nums) and nums[-1] == a))
        return out

    class Steps(TrainerCallback):
        def __init__(self):
            self.rows, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            reset_peak_rss()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.rows.append({"wall": time.perf_counter() - self.t0, "peak_gb": peak_rss_gb()})

    per_update = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(Path(args.prompts_file).parent / "trl_out"), report_to="none", save_strategy="no",
        logging_steps=1, max_steps=1 + args.steps, learning_rate=1e-6, num_generations=args.group,
        per_device_train_batch_size=args.trl_micro_batch,
        gradient_accumulation_steps=per_update // args.trl_micro_batch,
        max_completion_length=args.tokens, generation_kwargs={"min_new_tokens": args.tokens}, temperature=1.0,
        beta=0.0, num_iterations=1, bf16=False, fp16=False, use_cpu=True, seed=0, dataloader_num_workers=0,
        gradient_checkpointing=not args.trl_no_checkpointing,  # TRL's default; issue #31 measured it off
        model_init_kwargs={"dtype": torch.float32})
    steps = Steps()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=correct, args=config,
                          train_dataset=Dataset.from_list(spec["rows"]), callbacks=[steps])
    trainer.train()
    return {"side": "trl", "steps": steps.rows[1:], "warmup": steps.rows[0], "peak_gb": peak_rss_gb(),
            "completion_tokens": per_update * args.tokens}


def median(rows, key) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-micro-batch", type=int, default=32, help="TRL's per_device_train_batch_size")
    ap.add_argument("--trl-no-checkpointing", action="store_true", help="activation checkpointing off, as issue #31 "
                    "measured TRL (on 2026-12-08 that run ended without a result here: not yet explained)")
    ap.add_argument("--lams", default="0,1", help="lambda values of our runs (the first is the headline)")
    ap.add_argument("--worker", choices=("trl",), help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_trl(args)), flush=True)
        return
    from benchmarks.rl_step import summarize

    work = ROOT / ".cache" / "vs_trl"
    work.mkdir(parents=True, exist_ok=True)
    prompts_file = work / "prompts.json"
    write_prompts(prompts_file, args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_LOGGING_LEVEL": "ERROR",
           "TOKENIZERS_PARALLELISM": "false"}
    shape = ["--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group), "--tokens",
             str(args.tokens), "--threads", str(args.threads)]

    def child(cmd) -> dict:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"vs_trl: {cmd[1]} {cmd[-4:]} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(lines[-1][len("RESULT "):])

    trl_cmd = [str(trl_python()), __file__, "--worker", "trl", "--prompts-file", str(prompts_file),
               "--trl-micro-batch", str(args.trl_micro_batch), *shape]
    trl_cmd += ["--trl-no-checkpointing"] if args.trl_no_checkpointing else []
    lams = [float(x) for x in args.lams.split(",")]
    trl, ours = [], {lam: [] for lam in lams}
    for r in range(args.rounds):
        res = child(trl_cmd)
        trl.append({"wall": median(res["steps"], "wall"), "peak_gb": res["peak_gb"]})
        timed = [round(x["wall"], 1) for x in res["steps"]]
        print(f"round {r + 1} TRL GRPOTrainer: step {trl[-1]['wall']:.1f} s (timed {timed}), "
              f"{res['completion_tokens'] / trl[-1]['wall']:.1f} completion tok/s, peak RSS {res['peak_gb']:.2f} GB",
              flush=True)
        for lam in lams:
            m = summarize(child([sys.executable, str(ROOT / "benchmarks" / "rl_step.py"), "--worker", "ours",
                                 "--lam", str(lam), "--set", "train.pack=true",
                                 "--set", "train.micro_batch_tokens=auto", *shape]))
            ours[lam].append(m)
            print(f"round {r + 1} ours lambda={lam:g}: step {m['wall_s']:.1f} s (rollout {m['rollout_s']:.1f}, "
                  f"fwd+bwd {m['forward_backward_s']:.1f}, optimizer {m['optimizer_s']:.1f}, sync {m['sync_s']:.2f}), "
                  f"{m['completion_tok_s']:.1f} completion tok/s, training MFU {m['mfu']:.0%} of "
                  f"{m['matmul_gflops']:.0f} GFLOP/s, peak RSS trainer {m['trainer_peak_gb']:.2f} GB, engine "
                  f"{m['engine_peak_gb']:.2f} GB", flush=True)
    tokens = args.prompts * args.group * args.tokens
    trl_tok_s = tokens / median(trl, "wall")
    trl_peak = max(x["peak_gb"] for x in trl)
    for lam in lams:
        tok_s = tokens / statistics.median(m["wall_s"] for m in ours[lam])
        peak = max(max(m["trainer_peak_gb"], m["engine_peak_gb"]) for m in ours[lam])
        print(f"lambda={lam:g}: {tok_s:.1f} completion tok/s, x{tok_s / trl_tok_s:.2f} of TRL's {trl_tok_s:.1f}; "
              f"largest process {peak:.2f} GB, x{peak / trl_peak:.2f} of TRL's {trl_peak:.2f} GB")
    head = lams[0]
    tok_s = tokens / statistics.median(m["wall_s"] for m in ours[head])
    peak = max(max(m["trainer_peak_gb"], m["engine_peak_gb"]) for m in ours[head])
    print(f"vs_trl: {tok_s:.1f} tokens/s, x{tok_s / trl_tok_s:.2f} vs TRL GRPOTrainer (memory x{peak / trl_peak:.2f})")


if __name__ == "__main__":
    main()
