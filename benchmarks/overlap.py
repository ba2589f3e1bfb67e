"""Synchronous against overlapped rollouts (rollout.mode=sync|overlap, staleness 1) on the tiny recipe's RL
steps: the same warm start, prompts, seeds and step count per mode, each mode run twice, alternating
(sync, overlap, sync, overlap: the machine's speed drifts).

One SFT warm start (`--sft-steps`, its `start/` export) is shared by every run; each run is
`recipes/tiny_cpu.py model.path=<warm start> sft.steps=0 train.steps=N rollout.mode=MODE` in its own process.
Tokens/s: generated tokens over the summed step times of steps 1..N-1 (step 0 pays the engine's first
generation and is left out). Idle fractions are the loop's own `overlap/*_idle_fraction` scalars, averaged.
Not measured here: partial rollouts and a long-tailed length distribution (not implemented yet).
Usage: python benchmarks/overlap.py [--steps 10] [--sft-steps 200]   (about 12 minutes)
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


def rl_run(start: Path, out: Path, mode: str, steps: int) -> dict:
    run([f"model.path={start}", "sft.steps=0", f"train.steps={steps}", "eval.final=false",
         f"rollout.mode={mode}", f"train.out_dir={out}", "train.keep_checkpoints=0", "train.export_final=false"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/mean" in r and r["step"] >= 1]
    seconds = sum(r["time/step"] for r in rows)
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"tokens": sum(r["throughput/generated_tokens"] for r in rows), "seconds": seconds,
            "step_s": seconds / len(rows), "trainer_idle": mean("overlap/trainer_idle_fraction"),
            "engine_idle": mean("overlap/engine_idle_fraction"), "lag": mean("rollout/policy_lag"),
            "reward": mean("reward/mean")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sft-steps", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run([f"sft.steps={args.sft_steps}", "train.steps=0", "eval.final=false", f"train.out_dir={tmp / 'warm'}"])
        start = tmp / "warm" / "start"
        results = {"sync": [], "overlap": []}
        for rep in range(2):
            for mode in results:
                r = rl_run(start, tmp / f"{mode}{rep}", mode, args.steps)
                results[mode].append(r)
                print(f"{mode} #{rep + 1}: {r['tokens'] / r['seconds']:.0f} tokens/s, {r['step_s']:.2f} s/step, "
                      f"trainer idle {r['trainer_idle']:.2f}, engine idle {r['engine_idle']:.2f}, "
                      f"lag {r['lag']:.1f}, reward {r['reward']:.3f}", flush=True)
    rate = {m: sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs) for m, rs in results.items()}
    print(f"overlap: {rate['overlap']:.0f} tokens/s, x{rate['overlap'] / rate['sync']:.2f} vs sync "
          f"({rate['sync']:.0f} tokens/s)")


if __name__ == "__main__":
    main()
