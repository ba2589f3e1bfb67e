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
