"""Does RL^V buy test-time scaling? Both arms from one warm start, 2 seeds each, >= 500 held-out problems.

  warm start:  SFT with the verification format (shared by every arm)
  RL^V:        GRPO + lambda=1 verifier loss        base: GRPO, lambda=0 (its own P(Yes) as LLM-as-judge)
Prints each run, the bar of issue #3 with pass/fail, and last the path of a JSON with the seed means
(RL^V keys as in the recipe's metrics.json; the base arm's as base_<key>).
Usage: python benchmarks/rlv_effect.py [--steps 100] [--problems 500] [--seeds 0 1] [--out runs/rlv_effect]
       [--set rollout.mode=overlap ...]   (overrides for both RL arms)
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_cpu.py"
KEYS = ("pass@1", "pass@16", "majority@16", "weighted@16", "best_of@16", "weighted_likelihood@16",
        "verifier_auc_within_prompt")


def run(out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, str(RECIPE), f"train.out_dir={out}", "train.resume=false", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"run failed: {out}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    path = Path(proc.stdout.strip().splitlines()[-1])
    return json.loads(path.read_text())


def mean(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/rlv_effect")
    ap.add_argument("--set", action="append", default=[], help="a config override for both RL arms")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    ev = [f"eval.num_problems={args.problems}"]
    # the warm start, evaluated on the same held-out problems: where both arms begin
    warm = run(out / "warm_start", f"sft.steps={args.sft_steps}", "train.steps=0", *ev)
    print("warm start:", json.dumps({k: round(warm[k], 3) for k in KEYS}))
    arms = {}
    for lam in (1.0, 0.0):
        rows = []
        for seed in args.seeds:
            rows.append(run(out / f"lam{lam:g}_seed{seed}", f"model.path={out / 'warm_start' / 'start'}",
                            "sft.steps=0", f"verifier.lam={lam}", f"train.seed={seed}", f"train.steps={args.steps}",
                            *ev, *args.set))
            print(f"lambda={lam:g} seed={seed}:", json.dumps({k: round(rows[-1][k], 3) for k in KEYS}))
        arms[lam] = mean(rows)
    rlv, base = arms[1.0], arms[0.0]
    result = {**rlv, **{f"base_{k}": v for k, v in base.items()},
              "warm_start": warm, "runs": {"seeds": args.seeds, "steps": args.steps, "problems": args.problems,
                                     "overrides": args.set}}
    checks = {
        "weighted@16 >= majority@16 + 3 points": rlv["weighted@16"] >= rlv["majority@16"] + 0.03,
        "within-prompt AUC >= 0.75": rlv["verifier_auc_within_prompt"] >= 0.75,
        "weighted@16 > base majority@16 and base weighted@16":
            rlv["weighted@16"] > max(base["majority@16"], base["weighted@16"]),
        "pass@1 >= base pass@1 - 2 points": rlv["pass@1"] >= base["pass@1"] - 0.02,
    }
    result["bar"] = checks
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    path = out / "rlv_effect.json"
    path.write_text(json.dumps(result, indent=2))
    print(headline(rlv, base))
    print(path)


def headline(rlv, base):
    """RL^V's verifier-weighted vote against the baseline of the same run: base GRPO's best vote."""
    best_base = max(base["majority@16"], base["weighted@16"])
    return (f"rlv_effect: weighted@16 {rlv['weighted@16']:.3f} (majority@16 {rlv['majority@16']:.3f}), "
            f"x{rlv['weighted@16'] / best_base:.2f} vs base GRPO's best vote@16 {best_base:.3f}")


if __name__ == "__main__":
    main()
