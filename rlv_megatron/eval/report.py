"""Human-facing outputs of a run: a Markdown table of test-time scaling and a PNG of the curves."""

from __future__ import annotations

import re
from pathlib import Path

_K = re.compile(r"^(pass|majority|weighted|best_of|weighted_likelihood|best_of_likelihood)@(\d+)$")


def by_k(final: dict) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for key, v in final.items():
        m = _K.match(key)
        if m:
            series.setdefault(m.group(1), {})[int(m.group(2))] = v
    return series


def table(final: dict) -> str:
    series = by_k(final)
    ks = sorted({k for s in series.values() for k in s})
    names = [n for n in ("pass", "majority", "weighted", "best_of", "weighted_likelihood", "best_of_likelihood")
             if n in series]
    lines = ["| k | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{series[n].get(k, float('nan')):.3f}" for n in names) + " |")
    extra = {k: v for k, v in final.items() if not _K.match(k)}
    lines += [""] + [f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def headline(final: dict) -> str:
    """One line: what the verifier bought at the largest k (weighted vote over majority vote)."""
    n = max(by_k(final).get("weighted", {0: None}))
    if not n:
        return ""
    gain = 100 * (final[f"weighted@{n}"] - final[f"majority@{n}"])
    return (f"held-out: pass@1 {final['pass@1']:.3f}, majority@{n} {final[f'majority@{n}']:.3f}, "
            f"weighted@{n} {final[f'weighted@{n}']:.3f} ({gain:+.1f} points from the verifier), "
            f"verifier AUC within a prompt {final.get('verifier_auc_within_prompt', float('nan')):.3f}")


def plot(history: list[dict], final: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rl = [h for h in history if "reward/mean" in h]
    for key, ax in (("reward/mean", axes[0]), ("verifier/auc_within_prompt", axes[1])):
        pts = [(h["step"], h[key]) for h in rl if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(key)
        ax.set_xlabel("RL step")
    for name, pts in by_k(final).items():
        ks = sorted(pts)
        axes[2].plot(ks, [pts[k] for k in ks], marker="o", label=name)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("samples k")
    axes[2].set_title("held-out accuracy")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
