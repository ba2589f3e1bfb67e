"""benchmarks/rlv_ablations.py --summary: the table from a saved JSON without running anything, the JSON's path
last; seed means, the compute-efficiency rows against hand-computed ones, and the BENCHMARKS.md section it
fills."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import rlv_ablations  # noqa: E402


def _metrics(**by_k) -> dict:
    """A metrics.json with curves {name: {k: value}} and the table's other keys."""
    m = {f"{name}@{k}": v for name, curve in by_k.items() for k, v in curve.items()}
    m.update({"verifier_auc_within_prompt": 0.8, "verifier_ece": 0.05, "answers_per_problem": 4.0})
    m.setdefault("best_of@16", 0.3)
    return m


BASE = _metrics(majority={1: 0.2, 2: 0.22, 4: 0.3, 8: 0.35, 16: 0.4},
                weighted={1: 0.2, 2: 0.25, 4: 0.28, 8: 0.33, 16: 0.38}, **{"pass": {1: 0.2, 16: 0.6}})
RLV = _metrics(majority={1: 0.21, 2: 0.25, 4: 0.3, 8: 0.33, 16: 0.35},
               weighted={1: 0.2, 2: 0.3, 4: 0.35, 8: 0.45, 16: 0.5}, **{"pass": {1: 0.2, 16: 0.7}})


def test_efficiency_against_the_base_best_vote_by_hand():
    rows = rlv_ablations.efficiency_rows(RLV, BASE)
    # base best vote by k: .2, .25, .3, .35, .4; RL^V weighted .2 -> 1 sample, .3 -> 4, .35 -> 8, .45/.5 never
    assert rows[0].startswith("| 1 | 0.200 | 0.200 | 1.0 | x1.0 |")
    assert rows[1].startswith("| 2 | 0.300 | 0.250 | 4.0 | x2.0 |")
    assert rows[2].startswith("| 4 | 0.350 | 0.300 | 8.0 | x2.0 |")
    assert rows[3] == "| 8 | 0.450 | 0.350 | > 16 | > x2.0 |" and rows[4] == "| 16 | 0.500 | 0.400 | > 16 | > x1.0 |"


def test_summary_reads_the_json_only_and_prints_its_path_last(tmp_path):
    rlv2 = {**RLV, "weighted@16": 0.4}
    runs = {"warm": {"metrics": BASE}, "lam1_seed0": {"metrics": RLV}, "lam1_seed1": {"metrics": rlv2},
            "lam0_seed0": {"metrics": BASE}, "lam0_seed1": {"metrics": BASE},
            "faithful_seed0": {"metrics": RLV, "during": [{"step": 24, **RLV}]}}
    (tmp_path / "ablations.json").write_text(json.dumps({"settings": {}, "runs": runs}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rlv_ablations.py"), "--summary", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "ablations.json")
    lam1 = next(line for line in lines if line.startswith("| lam1 "))
    assert "(2 seeds)" in lam1 and "| 0.450 |" in lam1  # weighted@16: the mean of .5 and .4
    assert next(line for line in lines if line.startswith("| head ")).count("not run") == len(rlv_ablations.KEYS)
    assert "| 25 | 0.800, +15.0 |" in done.stdout  # the faithful curve: step 25, AUC, weighted - majority
    assert not list(tmp_path.glob("*/"))  # nothing ran


def test_benchmarks_section_is_replaced_between_its_markers(tmp_path, monkeypatch):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"head\n{rlv_ablations.BENCH_BEGIN}\nold\n{rlv_ablations.BENCH_END}\ntail\n")
    monkeypatch.setattr(rlv_ablations, "ROOT", tmp_path)
    rlv_ablations.write_benchmarks("new table")
    assert doc.read_text() == f"head\n{rlv_ablations.BENCH_BEGIN}\nnew table\n{rlv_ablations.BENCH_END}\ntail\n"
