"""Synchronous against overlapped rollouts (rollout.mode=sync|overlap, staleness 1), each with and without
partial rollouts (rollout.max_step_tokens), on the same RL work, on two workloads:
- tiny: the tiny recipe as it is, from a 200-step SFT warm start (responses of 5..24 tokens, short tail);
- long_tail: a 10-step SFT warm start, which ends its responses at its stop token almost at random, with
  algo.max_tokens=96: response lengths from 2 to 96 in one step (a long tail of rambling samples).
Per workload the same warm start, prompts, seeds and step count per mode; each mode run --reps times,
alternating (the machine's speed drifts); each run is `recipes/tiny_cpu.py model.path=<warm start> ...` in
its own process.
Tokens/s: response tokens of the trained samples over the summed step times of steps 1..N-1 (step 0 pays the
engine's first generation and is left out; under partial rollouts, tokens generated for samples still in the
pool at the end are work not counted). Idle fractions are the loop's own `overlap/*_idle_fraction` scalars.
Usage: python benchmarks/overlap.py [--steps 10] [--reps 2]   (about 20 minutes)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_cpu.py"


def run(args: list[str]) -> None:
    out = subprocess.run([sys.executable, str(RECIPE), *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")


WORKLOADS = {  # name: (SFT warm-start steps, overrides of every RL run, overrides of partial rollouts)
    "tiny": (200, [], ["rollout.max_step_tokens=12", "rollout.partial_spare_groups=8"]),
    "long_tail": (10, ["algo.max_tokens=96"], ["rollout.max_step_tokens=24", "rollout.partial_spare_groups=8"]),
}
MODES = ("sync", "sync+partial", "overlap", "overlap+partial")


def rl_run(start: Path, out: Path, overrides: list[str], steps: int) -> dict:
    run([f"model.path={start}", "sft.steps=0", f"train.steps={steps}", "eval.final=false", *overrides,
         f"train.out_dir={out}", "train.keep_checkpoints=0", "train.export_final=false"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/mean" in r and r["step"] >= 1]
    seconds = sum(r["time/step"] for r in rows)
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"tokens": sum(r["throughput/generated_tokens"] for r in rows), "seconds": seconds,
            "step_s": seconds / len(rows), "trainer_idle": mean("overlap/trainer_idle_fraction"),
            "engine_idle": mean("overlap/engine_idle_fraction"), "lag": mean("rollout/token_lag_mean"),
            "reward": mean("reward/mean"), "len_min": min(r["response/length_min"] for r in rows),
            "len_max": max(r["response/length_max"] for r in rows), "len_mean": mean("response/length_mean")}


def mode_overrides(mode: str, partial: list[str]) -> list[str]:
    base, _, extra = mode.partition("+")
    return [f"rollout.mode={base}", *(partial if extra else [])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workloads", default="tiny,long_tail")
    args = ap.parse_args()
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.workloads.split(","):
            sft_steps, common, partial = WORKLOADS[name]
            warm = tmp / f"warm_{name}"
            run([f"sft.steps={sft_steps}", "train.steps=0", "eval.final=false", f"train.out_dir={warm}"])
            results = {m: [] for m in MODES}
            for rep in range(args.reps):
                for mode in MODES:
                    r = rl_run(warm / "start", tmp / f"{name}_{mode}{rep}", common + mode_overrides(mode, partial),
                               args.steps)
                    results[mode].append(r)
                    print(f"{name} {mode} #{rep + 1}: {r['tokens'] / r['seconds']:.0f} tokens/s, "
                          f"{r['step_s']:.2f} s/step, trainer idle {r['trainer_idle']:.2f}, engine idle "
                          f"{r['engine_idle']:.2f}, token lag {r['lag']:.2f}, reward {r['reward']:.3f}, lengths "
                          f"{r['len_min']}..{r['len_max']} (mean {r['len_mean']:.1f})", flush=True)
            rates[name] = {m: sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs) for m, rs in results.items()}
            for mode in MODES[1:]:
                print(f"{name} {mode}: {rates[name][mode]:.0f} tokens/s, x{rates[name][mode] / rates[name]['sync']:.2f} "
                      f"vs sync ({rates[name]['sync']:.0f} tokens/s)", flush=True)
    head = rates.get("tiny") or next(iter(rates.values()))
    print(f"overlap: {head['overlap']:.0f} tokens/s, x{head['overlap'] / head['sync']:.2f} vs sync "
          f"({head['sync']:.0f} tokens/s)")


if __name__ == "__main__":
    main()
