"""Write docs/configuration.md from the config schema (rlv_megatron/config.py): every section and field
with its type, default, allowed values and the comment beside it in the source. `--check` exits 1 when the
file is out of date (tests/test_docs.py runs it).
Usage: python scripts/config_reference.py [--check]
"""

import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlv_megatron import config  # noqa: E402

OUT = ROOT / "docs" / "configuration.md"
PIPE = "\\|"  # a literal | inside a Markdown table cell
FIELD = re.compile(r"^\s+(\w+): [^=]+?(?:= .*?)?(?:\s+#\s*(.*))?$")


def field_comments(cls) -> dict[str, str]:
    """Each field's comment: the one on its line, after any full-line comments right above it."""
    notes, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = FIELD.match(line)
        if m and not stripped.startswith(("def ", "@")):
            notes[m.group(1)] = " ".join(above + ([m.group(2)] if m.group(2) else []))
        above = []
    return notes


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from `rlv_megatron/config.py` by `python scripts/config_reference.py`; do not edit by hand.",
           "Every field can be set in a recipe's YAML (`rlv_megatron/conf/`) or overridden on the command line",
           "as `section.field=value` (Hydra); unknown fields, wrong types and values outside the allowed set fail",
           "at start-up naming the field.", ""]
    for section in dataclasses.fields(config.Config):
        cls = section.type if isinstance(section.type, type) else getattr(config, section.type)
        notes = field_comments(cls)
        out += [f"## `{section.name}`", "", (cls.__doc__ or "").strip() if cls.__doc__ and
                not cls.__doc__.startswith(cls.__name__ + "(") else "", "",
                "| field | type | default | notes |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            note = notes.get(f.name, "")
            if key in config._CHOICES:
                note = f"one of {', '.join(repr(c) for c in config._CHOICES[key])}" + (f"; {note}" if note else "")
            typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out.append(f"| `{f.name}` | `{typ}` | `{default_of(f)}` | {note.replace('|', PIPE)} |")
        out.append("")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.write_text(text)
        print(OUT)
