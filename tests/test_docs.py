"""Docs that must stay true: the configuration reference is generated from the schema."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_up_to_date():
    out = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert "`train.logprob_impl`" not in text and "| `logprob_impl` | `str` | `'fused'` | one of 'fused', 'logits'" in text


def test_design_map_names_modules_that_exist():
    """Every module docs/design.md names (a path, or a bare file name found in the package or a top-level
    folder) exists."""
    import re

    text = (ROOT / "docs" / "design.md").read_text()
    names = set(re.findall(r"[\w./]*\w\.py\b", text)) | {t for t in re.findall(r"`([\w./]+/)`", text)}
    assert len(names) > 30, sorted(names)  # the map names the package module by module
    package = ROOT / "rlv_megatron"

    def found(n):
        bare = "/" not in n and any([*package.rglob(n), *ROOT.glob(f"*/{n}")])
        return (ROOT / n).exists() or (package / n).exists() or bare

    missing = [n for n in sorted(names) if not found(n)]
    assert not missing, f"docs/design.md names modules that do not exist: {missing}"


def test_readme_quotes_the_recorded_default_run():
    """The headline the README quotes for `python recipes/tiny_cpu.py` is the recorded run's
    (benchmarks/records/tiny_cpu.json), which is what report.headline prints for the recorded metrics."""
    import json

    from rlv_megatron.eval.report import headline

    record = json.loads((ROOT / "benchmarks" / "records" / "tiny_cpu.json").read_text())
    assert headline(record["final"]) == record["printed"]
    readme = " ".join((ROOT / "README.md").read_text().split())  # the README wraps its lines
    assert f"printed `{record['printed']}`" in readme, "README: quote the recorded run's headline"
    assert f"{record['took']} here on {record['date']}" in readme
