"""`rlv eval` outputs: metrics.json, report.md, accuracy_vs_samples.png, accuracy_vs_tokens.png, tb/ (each
written to a temporary sibling, then renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rlv_megatron.eval import report as run_report
from rlv_megatron.atomic import atomic_write_text


def markdown(rep: dict) -> str:
    parts = ["# Test-time scaling", ""]
    sc = rep.get("scores", {})
    if sc.get("kind", "probability") != "probability":
        parts += [f"Scores: eval.score_kind={sc['kind']} ({sc['doc']})."]
        if "reward_temperature" in sc:
            parts[-1] += f" Vote weights exp((r - max r) / T), T={sc['reward_temperature']:g}."
        parts += [f"- {name}: not defined ({why})" for name, why in sc.get("undefined", {}).items()] + [""]
    for label, m in rep["budgets"].items():
        parts += [f"## max tokens {label} (N={m['samples']}, mean length {m['mean_length']:.1f})", "",
                  run_report.table(m), ""]
    parts += ["## Best strategy per budget", "", "| max tokens | k | strategy | accuracy |", "|---|---|---|---|"]
    parts += [f"| {b} | {s['k']} | {s['strategy']} | {s['accuracy']:.3f} |" for b, s in rep["best_strategy"].items()]
    if "adaptive" in rep:
        parts += ["", "## Adaptive length (weighted vote, raise the budget until confidence >= tau)", "",
                  "| tau | accuracy | tokens per problem | mean budget |", "|---|---|---|---|"]
        parts += [f"| {a['tau']:g} | {a['accuracy']:.3f} | {a['tokens']:.0f} | {a['mean_budget']:.0f} |"
                  for a in rep["adaptive"]]
    for label, rows in rep.get("efficiency", {}).items():
        parts += ["", f"## Compute efficiency against the baseline (max tokens {label})", "",
                  "| k | weighted@k | baseline majority needs | factor |", "|---|---|---|---|"]
        for k, e in rows.items():
            need = "not reached" if e["baseline_samples"] is None else f"{e['baseline_samples']:.1f}"
            factor = "-" if e["factor"] is None else f"x{e['factor']:.2f}"
            parts.append(f"| {k} | {e['weighted']:.3f} | {need} | {factor} |")
    return "\n".join(parts) + "\n"


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def plots(rep: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(rep["budgets"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in run_report.by_k(rep["budgets"][budgets[-1]]).items():
        ax.plot(sorted(pts), [pts[k] for k in sorted(pts)], marker="o", label=name)
    if budgets[-1] in rep.get("baseline", {}):
        pts = run_report.by_k(rep["baseline"][budgets[-1]])["majority"]
        ax.plot(sorted(pts), [pts[k] for k in sorted(pts)], "k--", marker="x", label="baseline majority")
    ax.set(xlabel="samples k", ylabel="accuracy", title=f"max tokens {budgets[-1]}")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "accuracy_vs_samples.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, m in rep["budgets"].items():  # tokens per problem = k samples x mean length
        for name, style in (("weighted", "-"), ("majority", ":")):
            pts = run_report.by_k(m).get(name, {})
            ax.plot([k * m["mean_length"] for k in sorted(pts)], [pts[k] for k in sorted(pts)], style, marker="o",
                    label=f"{name}, max tokens {label}")
    if "adaptive" in rep:
        ax.plot([a["tokens"] for a in rep["adaptive"]], [a["accuracy"] for a in rep["adaptive"]], "k-", marker="s",
                label="adaptive length (tau sweep)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="generated tokens per problem", ylabel="accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "accuracy_vs_tokens.png")
    plt.close(fig)


def tensorboard(rep: dict, out: Path) -> None:
    """Scalars `max_tokens_{B}/{metric}` at step k (k-free metrics at step 0), `adaptive/*` per tau index."""
    from torch.utils.tensorboard import SummaryWriter

    tmp = out / f".tb.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SummaryWriter(str(tmp))
    for label, m in rep["budgets"].items():
        for key, v in m.items():
            name, _, k = key.partition("@")
            if isinstance(v, (int, float)) and v == v:  # NaN (undefined AUC) and None are left out
                writer.add_scalar(f"max_tokens_{label}/{name}", v, int(k) if k else 0)
    for i, a in enumerate(rep.get("adaptive", [])):
        for key in ("tau", "accuracy", "tokens"):
            writer.add_scalar(f"adaptive/{key}", a[key], i)
    writer.close()
    old = out / f".tb.old-{os.getpid()}"
    if (out / "tb").exists():
        os.rename(out / "tb", old)
    os.rename(tmp, out / "tb")
    shutil.rmtree(old, ignore_errors=True)


def write_all(rep: dict, out: str | Path) -> Path:
    """Every output under `out`; returns the path of metrics.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", markdown(rep))
    plots(rep, out)
    tensorboard(rep, out)
    atomic_write_text(out / "metrics.json", json.dumps(rep, indent=1))
    return out / "metrics.json"
