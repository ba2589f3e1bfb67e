"""RL^V's comparisons on the synthetic task (issue #17), every arm 2 seeds, >= 500 held-out problems x 16 samples.

Starts (SFT warm starts, 600 steps, evaluated like the arms):
  warm            with verification turns (Yes/No): the start of every arm unless stated
  warm_head       the same SFT with a classification head instead (verifier.kind=head)
  warm_noverify   no verification turns at all (sft.verify=false): the paper's setting, a base model that has
                  never been trained to answer Yes/No
Arms (100 RL steps from `warm` unless stated):
  lam0 .. lam3    GRPO with lambda in {0, 0.1, 0.3, 1, 3} (lam0: base GRPO judging itself)
  head            GRPO^V with the classification head, from warm_head
  rloo_v / rloo   leave-one-out PPO(^V): 2 epochs x 4 mini-batches, no std normalisation, lambda 1 / 0, at
                  lr 2.5e-5 (the recipe's 2e-4 / 8 updates); *_lr2e-4: the same at 2e-4, which collapsed
  drgrpo_v / drgrpo  Dr.GRPO(^V), lambda 1 / 0
  kl_v / kl       the diversity mitigation: a k3 KL to the warm start (algo.kl_beta=0.05), lambda 1 / 0;
                  kl_strong_v / kl_strong: the same at algo.kl_beta=0.3
  faithful        GRPO^V from warm_noverify, 300 steps, evaluated every 25; the two-way Yes/No loss
                  (verifier.loss=yes_no), as the full-vocabulary CE starts near 13 from such a start
Evaluations without training:
  judge           lam0's pools scored by the frozen warm start (a separate LLM-as-judge), against lam0 judging
                  itself; a self-rescore of the same pool must reproduce its scores (checked)
  hard / shifted  warm, lam1, lam0 on 5-number problems (easy-to-hard) and on numbers 16..30
Derived from the pools: compute efficiency (samples base GRPO's best vote needs to reach RL^V's weighted@k)
and diversity (distinct answers per problem, pass@16).

Resumable: every finished run is recorded in <out>/ablations.json and skipped when the script runs again (an
interrupted run starts over). Running time on 2 CPU cores: about 3 hours for everything (about 3.5 minutes per
100-step arm, 12 per faithful run, 1 per evaluation). Not in CI.
Usage: python benchmarks/rlv_ablations.py [--only ARM ...] [--seeds 0 1] [--out runs/rlv_ablations]
       python benchmarks/rlv_ablations.py --summary [--write-benchmarks]   (no runs; the JSON's path last)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "tiny_cpu.py"
KEYS = ("pass@1", "pass@16", "majority@16", "weighted@16", "best_of@16", "verifier_auc_within_prompt",
        "verifier_ece", "answers_per_problem")
STARTS = {"warm": [], "warm_head": ["verifier.kind=head"], "warm_noverify": ["sft.verify=false"]}
LOO = ["algo.advantage=rloo", "algo.ppo_epochs=2", "algo.ppo_minibatches=4"]
# 8 Adam updates a step at the recipe's lr (2e-4, tuned for one) collapsed both LOO arms (first attempt, kept
# in the table); lr / 8 moves the weights about as far per step as one update does
LOO_LR = ["optim.lr=2.5e-5"]
DR = ["algo.advantage=dr_grpo", "algo.loss_agg=constant"]
KL = ["algo.kl_beta=0.05"]
KL_STRONG = ["algo.kl_beta=0.3"]
# arm -> (start, overrides)
ARMS = {
    **{f"lam{lam:g}": ("warm", [f"verifier.lam={lam}"]) for lam in (0, 0.1, 0.3, 1, 3)},
    "head": ("warm_head", ["verifier.kind=head", "verifier.lam=1"]),
    "rloo_v": ("warm", LOO + LOO_LR + ["verifier.lam=1"]), "rloo": ("warm", LOO + LOO_LR + ["verifier.lam=0"]),
    "rloo_v_lr2e-4": ("warm", LOO + ["verifier.lam=1"]), "rloo_lr2e-4": ("warm", LOO + ["verifier.lam=0"]),
    "drgrpo_v": ("warm", DR + ["verifier.lam=1"]), "drgrpo": ("warm", DR + ["verifier.lam=0"]),
    "kl_v": ("warm", KL + ["verifier.lam=1"]), "kl": ("warm", KL + ["verifier.lam=0"]),
    "kl_strong_v": ("warm", KL_STRONG + ["verifier.lam=1"]), "kl_strong": ("warm", KL_STRONG + ["verifier.lam=0"]),
    # two-way Yes/No loss: after an SFT without the format, Yes/No hold almost no probability at the verify
    # position and the full-vocabulary CE starts near 13 (docs: toy findings, where it wrecked the policy)
    "faithful": ("warm_noverify", ["verifier.lam=1", "verifier.loss=yes_no", "train.steps=300",
                                   "train.eval_every=25"]),
}
SHIFTS = {"hard": ["task.n_numbers=5"], "shifted": ["task.min_number=16", "task.max_number=30"]}
SHIFTED_MODELS = ("warm", "lam1", "lam0")
BENCH_BEGIN, BENCH_END = "<!-- rlv_ablations:begin -->", "<!-- rlv_ablations:end -->"


class State:
    """<out>/ablations.json: {run name: its record}, rewritten atomically after every run."""

    def __init__(self, out: Path):
        self.path = out / "ablations.json"
        self.runs = json.loads(self.path.read_text())["runs"] if self.path.exists() else {}

    def save(self, settings: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": settings, "runs": self.runs}, indent=1))
        os.replace(tmp, self.path)


def recipe(out: Path, overrides: list[str]) -> dict:
    """One tiny_cpu run; its metrics.json, and the in-run evaluations from history.json."""
    cmd = [sys.executable, str(RECIPE), f"train.out_dir={out}", "train.resume=false", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"run failed: {out}")
    final = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    history = json.loads((out / "history.json").read_text())
    during = [{k: e[k] for k in ("step", *KEYS) if k in e} for e in history.get("during_rl") or []]
    return {"metrics": final, "during": during, "seconds": round(time.perf_counter() - t0, 1)}


def judge(pool_path: Path, judge_dir: Path, problems: int) -> dict:
    """The metrics of a pool re-scored by the model in `judge_dir` asked the same verification question."""
    from rlv_megatron.eval.equivalence import AnswerKeys
    from rlv_megatron.eval.metrics import pool_metrics
    from rlv_megatron.hydra_app import compose
    from rlv_megatron.rollout.engine import make_engine
    from rlv_megatron.run import task_config
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import make_task

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    cfg = compose("tiny_cpu", [f"model.path={judge_dir}", f"eval.num_problems={problems}"])
    task_cfg, num_eval = task_config(cfg)
    task = make_task(task_cfg, cfg.verifier.question, num_eval, seed=0, tokenizer_path=cfg.model.path)
    fmt = ChatFormat.for_config(task.tokenizer, cfg)
    by_id = {p.id: p for p in task.eval}
    pool: list[list[dict]] = []
    for line in pool_path.read_text().splitlines():
        row = json.loads(line)
        if not pool or pool[-1][0]["problem_id"] != row["problem_id"]:
            pool.append([])
        pool[-1].append(row)
    rows = [r for rows in pool for r in rows]
    prompts = [fmt.verify_ids(fmt.prompt_ids(by_id[r["problem_id"]].prompt),
                              task.tokenizer.encode(r["sample"], add_special_tokens=False)) for r in rows]
    engine = make_engine("vllm", str(judge_dir), cfg.rollout)
    try:
        scores = engine.score_yes(prompts, fmt.yes_id, fmt.score_no_id)
    finally:
        engine.close()
        task.close()
    it = iter(scores)
    rescored = [[{**r, "score": next(it)} for r in rs] for rs in pool]
    with AnswerKeys(cfg.task.grader_workers, cfg.task.grader_timeout_s) as keys:
        metrics = pool_metrics(rescored, cfg.eval, keys)
    drift = max(abs(a - r["score"]) for a, r in zip(scores, rows))
    return {"metrics": metrics, "max_score_change": drift}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", default=None, help="runs to do (starts, arms, judge, hard, shifted)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--sft-steps", type=int, default=600, help="of the warm starts (fewer: a quick trial)")
    ap.add_argument("--out", default="runs/rlv_ablations")
    ap.add_argument("--summary", action="store_true", help="print the table from the saved JSON; no runs")
    ap.add_argument("--write-benchmarks", action="store_true", help="with --summary: put the table in BENCHMARKS.md")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = State(out)
    settings = {"seeds": args.seeds, "steps": args.steps, "problems": args.problems, "sft_steps": args.sft_steps}
    if args.summary:
        text = summary(state.runs, args.seeds)
        print(text)
        if args.write_benchmarks:
            write_benchmarks(text)
        print(state.path)
        return
    wanted = lambda name: args.only is None or name in args.only  # noqa: E731
    ev = [f"eval.num_problems={args.problems}"]

    def once(name: str, fn):
        if name in state.runs:
            return state.runs[name]
        state.runs[name] = fn()
        state.save(settings)
        return state.runs[name]

    for start, extra in STARTS.items():
        if wanted(start) or any(wanted(a) for a, (s, _) in ARMS.items() if s == start):
            once(start, lambda: recipe(out / start, [f"sft.steps={args.sft_steps}", "train.steps=0", *extra, *ev]))
    for arm, (start, extra) in ARMS.items():
        if wanted(arm):
            for seed in args.seeds:
                once(f"{arm}_seed{seed}", lambda: recipe(out / f"{arm}_seed{seed}", [
                    f"model.path={out / start / 'start'}", "sft.steps=0", f"train.seed={seed}",
                    f"train.steps={args.steps}", *ev, *extra]))
    if wanted("judge"):
        for seed in args.seeds:
            if not (out / f"lam0_seed{seed}" / "pool.jsonl").is_file():
                print(f"judge_seed{seed}: skipped, lam0_seed{seed} is not trained yet", flush=True)
                continue
            once(f"judge_seed{seed}", lambda: {
                "separate": judge(out / f"lam0_seed{seed}" / "pool.jsonl", out / "warm" / "start", args.problems),
                "self": judge(out / f"lam0_seed{seed}" / "pool.jsonl", out / f"lam0_seed{seed}" / "model",
                              args.problems)})
    for shift, extra in SHIFTS.items():
        if wanted(shift):
            for model in SHIFTED_MODELS:
                for seed in ([None] if model == "warm" else args.seeds):
                    name = model if seed is None else f"{model}_seed{seed}"
                    src = out / model / "start" if seed is None else out / name / "model"
                    if not src.is_dir():
                        print(f"{shift}_{name}: skipped, {src} is not trained yet", flush=True)
                        continue
                    once(f"{shift}_{name}", lambda: recipe(out / f"{shift}_{name}", [
                        f"model.path={src}", "sft.steps=0", "train.steps=0", *ev, *extra]))
    print(summary(state.runs, args.seeds))
    print(state.path)


# ---- the table ------------------------------------------------------------------------------------------

def seed_mean(runs: dict, name: str, seeds, pick=lambda r: r["metrics"]) -> dict | None:
    rows = [pick(runs[f"{name}_seed{s}"]) for s in seeds if f"{name}_seed{s}" in runs]
    if not rows:
        return None
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and v is not None]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys if all(r.get(k) is not None for r in rows)} | {
        "_n": len(rows)}


def fmt_row(name: str, m: dict | None, per_seed: list[float] | None = None) -> str:
    """A table row; `per_seed`: each seed's weighted@16 (the spread behind the mean)."""
    if m is None:
        return f"| {name} | " + " | ".join("not run" for _ in KEYS) + " | |"
    cells = []
    for k in KEYS:
        v = m.get(k)
        cells.append("n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
    seeds = m.get("_n")
    spread = " / ".join(f"{v:.3f}" for v in per_seed or [])
    return f"| {name}{'' if seeds is None else f' ({seeds} seeds)'} | " + " | ".join(cells) + f" | {spread} |"


def per_seed(runs: dict, name: str, seeds, pick=lambda r: r["metrics"]) -> list[float]:
    return [pick(runs[f"{name}_seed{s}"])["weighted@16"] for s in seeds if f"{name}_seed{s}" in runs]


def efficiency_rows(rlv: dict, base: dict) -> list[str]:
    """Per k: the samples base GRPO's best vote (majority or weighted, whichever is higher at each k) needs
    to reach RL^V's weighted@k, linear in log2 k between measured ks; "> 16" where it never does."""
    from rlv_megatron.eval.metrics import samples_to_reach
    from rlv_megatron.eval.report import by_k

    b, r = by_k(base), by_k(rlv)
    best = {k: max(b["majority"][k], b["weighted"][k]) for k in b["majority"]}
    rows = []
    for k, acc in sorted(r["weighted"].items()):
        need = samples_to_reach(best, acc)
        rows.append(f"| {k} | {acc:.3f} | {best.get(k, float('nan')):.3f} | "
                    + (f"> {max(best)}" if need is None else f"{need:.1f}") + " | "
                    + (f"> x{max(best) / k:.1f}" if need is None else f"x{need / k:.1f}") + " |")
    return rows


def summary(runs: dict, seeds) -> str:
    head = "| arm | " + " | ".join(KEYS) + " | weighted@16 per seed |"
    rule = "|---|" + "---:|" * (len(KEYS) + 1)
    out = ["### Arms (seed means; warm starts are one run)", "", head, rule]
    for start in STARTS:
        out.append(fmt_row(start, runs.get(start, {}).get("metrics")))
    for arm in ARMS:
        out.append(fmt_row(arm, seed_mean(runs, arm, seeds), per_seed(runs, arm, seeds)))
    for kind, label in (("separate", "lam0 judged by the frozen warm start"), ("self", "lam0 judged by itself (re-scored)")):
        pick = lambda r, k=kind: r[k]["metrics"]  # noqa: E731
        out.append(fmt_row(label, seed_mean(runs, "judge", seeds, pick), per_seed(runs, "judge", seeds, pick)))
    drift = [runs[f"judge_seed{s}"]["self"]["max_score_change"] for s in seeds if f"judge_seed{s}" in runs]
    if drift:
        out.append(f"\nSelf re-score check: largest change of a score {max(drift):.2e} (the pool's own scores).")
    for shift in SHIFTS:
        out += ["", f"### {shift}: " + " ".join(SHIFTS[shift]), "", head, rule]
        for model in SHIFTED_MODELS:
            if model == "warm":
                out.append(fmt_row(model, runs.get(f"{shift}_{model}", {}).get("metrics")))
            else:
                out.append(fmt_row(model, seed_mean(runs, f"{shift}_{model}", seeds),
                                   per_seed(runs, f"{shift}_{model}", seeds)))
    rlv, base = seed_mean(runs, "lam1", seeds), seed_mean(runs, "lam0", seeds)
    if rlv and base:
        out += ["", "### Compute efficiency: samples base GRPO's best vote needs for RL^V's weighted@k", "",
                "| k | RL^V weighted@k | base best vote@k | base samples needed | factor |",
                "|---:|---:|---:|---:|---:|", *efficiency_rows(rlv, base)]
    faithful = [runs[f"faithful_seed{s}"] for s in seeds if f"faithful_seed{s}" in runs]
    if faithful:
        out += ["", "### Paper-faithful start: RL^V learning to verify from RL data alone (in-run evaluations)", "",
                "| step | " + " | ".join(f"seed {s}: AUC, weighted - majority @16" for s in seeds[:len(faithful)]) + " |",
                "|---:|" + "---:|" * len(faithful)]
        steps = sorted({e["step"] for f in faithful for e in f["during"]})
        for step in steps:
            cells = []
            for f in faithful:
                e = next((e for e in f["during"] if e["step"] == step), None)
                cells.append("" if e is None else
                             f"{e['verifier_auc_within_prompt']:.3f}, {100 * (e['weighted@16'] - e['majority@16']):+.1f}")
            out.append(f"| {step + 1} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_benchmarks(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    if BENCH_BEGIN not in doc:
        raise SystemExit(f"BENCHMARKS.md has no {BENCH_BEGIN} ... {BENCH_END} section to fill")
    before, rest = doc.split(BENCH_BEGIN, 1)
    _, after = rest.split(BENCH_END, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{before}{BENCH_BEGIN}\n{text}\n{BENCH_END}{after}")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
