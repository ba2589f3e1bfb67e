"""Refuse at once to start spawned helper processes from a script's unguarded top level.

multiprocessing's spawn start method runs a fresh interpreter that re-imports the main script: top-level code
outside `if __name__ == "__main__":` runs again in every helper (it re-initialises the process group and hangs
in the rendezvous, or rebuilds the model, or dies), while the caller waits for the helper. Python notices only
inside the helper, if at all; this check runs in the caller, before anything starts.
"""

from __future__ import annotations

import ast
import sys


class UnguardedMainError(RuntimeError):
    """A spawned helper would re-run the calling script's top level."""


def _is_main_test(node: ast.expr) -> bool:
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)):
        return False
    sides = (node.left, node.comparators[0])
    return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def unguarded_main() -> tuple[str, int] | None:
    """(script, line) when this call comes from the main script's top level outside its
    `if __name__ == "__main__":` block; None otherwise (guarded, interactive, -c, or no source)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:  # interactive, -c, a notebook: spawn re-imports nothing
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:  # not called from the script's top level (e.g. a spawned helper's own main)
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    line = frame.f_lineno
    for node in ast.walk(tree):  # only the guard's body: its else branch runs in the helper too
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            if node.body[0].lineno <= line <= node.body[-1].end_lineno:
                return None
    return path, line


def require_main_guard(what: str) -> None:
    """Raise UnguardedMainError naming the script and the fix, when `what` would spawn from its top level."""
    where = unguarded_main()
    if where is not None:
        raise UnguardedMainError(
            f"{what} starts helper processes with multiprocessing 'spawn', which re-imports {where[0]} and "
            f"would re-run its top level (this call, line {where[1]}) in every helper: it hangs or fails. Put "
            "the script's top-level code under `if __name__ == \"__main__\":` (e.g. in a main() function).")
