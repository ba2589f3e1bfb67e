"""Loading math datasets (MATH, MATH-500, GSM8K) into `Problem`s.

A dataset is named by a file (.jsonl or .parquet), by a name in the project's cache (`math/train`,
`math500/test`, `gsm8k/test`, ...: rlv_megatron/assets.py), or by a Hugging Face dataset id
`hf:ID[:CONFIG]:SPLIT` (needs the `datasets` package and network access).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rlv_megatron.tasks.graders import extract_boxed, extract_gsm8k

__all__ = ["DataError", "Problem", "dataset_rows", "iter_rows", "load_gsm8k", "load_math", "read_rows"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """An unreadable dataset file, or a row without the fields a task needs (message has path:line)."""


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str  # gold answer string, as the grader named by `source` expects it
    source: str  # grader / dataset family: "math" or "gsm8k"


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs; for parquet the 'line' is the 1-based row number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only parquet users pay for it

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
            raise DataError(f"{path}: cannot read parquet: {e}") from e
        yield from enumerate(table.to_pylist(), 1)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .jsonl or .parquet)")


def read_rows(spec: str | Path) -> list[dict]:
    """All rows of a dataset (a .jsonl file, blank lines skipped, a .parquet file, a cached name or an hf:
    id); DataError on bad files or lines."""
    return [row for _, row in dataset_rows(spec)[1]]


def _hf_rows(spec: str) -> Iterator[tuple[int, dict]]:
    parts = spec[len("hf:"):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{spec}: expected hf:ID:SPLIT or hf:ID:CONFIG:SPLIT (e.g. hf:openai/gsm8k:main:test)")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need the `datasets` package (pip install datasets) "
                        "and network access; or name a file or a cached dataset") from None
    ds_id, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
    try:
        rows = datasets.load_dataset(ds_id, config, split=split)
    except Exception as e:  # the hub client raises many types; the spec is what the user can fix
        raise DataError(f"{spec}: cannot load: {e}") from e
    yield from enumerate(rows, 1)


def dataset_rows(spec: str | Path) -> tuple[Path, Iterator[tuple[int, dict]]]:
    """(a path naming the source in messages and ids, its (line, row) pairs) for a file, a cached dataset
    name or an `hf:` id."""
    from rlv_megatron import assets

    text = str(spec)
    if text.startswith("hf:"):
        return Path(text[3:].replace(":", "/")), _hf_rows(text)
    if text in assets.DATASETS and not Path(text).is_file():
        try:
            path = assets.dataset_path(text)
        except assets.AssetError as e:
            raise DataError(str(e)) from None
        return path, iter_rows(path)
    path = Path(spec)
    if not path.is_file() and not path.suffix:
        raise DataError(f"{spec}: not a file, a cached dataset ({', '.join(assets.DATASETS)}) "
                        "or hf:ID[:CONFIG]:SPLIT")
    return path, iter_rows(path)


def _text(row: dict, field: str) -> str | None:
    v = row.get(field)
    if v is None:
        return None
    v = str(v)
    return v if v.strip() else None


def _load(spec: str | Path, parse_row, source: str, skip_invalid: bool) -> list[Problem]:
    path, rows = dataset_rows(spec)
    out, skipped = [], []
    for lineno, row in rows:
        try:
            out.append(Problem(*parse_row(row, path, lineno), source=source))
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
    if skipped:
        log.warning("skipped %d invalid rows of %s, e.g. %s", len(skipped), path, skipped[0])
    return out


def _math_row(row: dict, path: Path, lineno: int) -> tuple[str, str, str]:
    prompt = _text(row, "problem")
    if prompt is None:
        raise DataError(f"{path}:{lineno}: missing field 'problem'")
    answer = _text(row, "answer")
    if answer is None:
        solution = _text(row, "solution")
        answer = extract_boxed(solution) if solution is not None else None
    if answer is None or not answer.strip():  # Hendrycks MATH train has a few empty `\boxed{}`
        raise DataError(f"{path}:{lineno}: missing field 'answer' (and no non-empty \\boxed{{}} in solution)")
    return _text(row, "unique_id") or f"{path.stem}:{lineno}", prompt, answer


def _gsm8k_row(row: dict, path: Path, lineno: int) -> tuple[str, str, str]:
    prompt = _text(row, "question")
    if prompt is None:
        raise DataError(f"{path}:{lineno}: missing field 'question'")
    text = _text(row, "answer")
    if text is None:
        raise DataError(f"{path}:{lineno}: missing field 'answer'")
    answer = extract_gsm8k(text) if "####" in text else None
    if answer is None:
        raise DataError(f"{path}:{lineno}: field 'answer' has no '#### <number>' final answer")
    # GSM8K's `idx` is the row's index in the original split; fall back to the line number.
    pid = f"{path.stem}/{row['idx']}" if row.get("idx") is not None else f"{path.stem}:{lineno}"
    return pid, prompt, answer


def load_math(path: str | Path, source: str = "math", skip_invalid: bool = False) -> list[Problem]:
    """MATH / MATH-500 rows (`path`: a file, a cached dataset name or an hf: id): gold = `answer` if the row has one, else the last \\boxed{} of `solution`.

    A row without a problem or an answer raises DataError, or with skip_invalid=True is skipped (logged).
    """
    return _load(path, _math_row, source, skip_invalid)


def load_gsm8k(path: str | Path, source: str = "gsm8k", skip_invalid: bool = False) -> list[Problem]:
    """GSM8K rows: prompt = `question`, gold = the number after `#### ` in `answer` (normalised)."""
    return _load(path, _gsm8k_row, source, skip_invalid)
