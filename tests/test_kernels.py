"""The Triton kernels' tests under the interpreter, in their own process.

TRITON_INTERPRET must be set before triton is first imported: triton.language's own helpers (tl.sum,
tl.maximum, ...) are @jit functions decorated at import, and an interpreted kernel cannot call compiled
ones. In this pytest process vLLM and others import triton early, and vLLM engines must not inherit the
variable, so the interpreted tests (tests/interpreted/) run in a child pytest started with it.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_under_the_triton_interpreter():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/interpreted"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_kernels_import_nothing_from_the_package():
    """kernels/ sits below rlv_megatron: the package calls the kernels, never the reverse."""
    import ast

    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "rlv_megatron" for n in names), f"{path.name}:{node.lineno}"
