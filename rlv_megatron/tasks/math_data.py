"""Loading math datasets (MATH, MATH-500, GSM8K) from jsonl or parquet into `Problem`s."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rlv_megatron.tasks.graders import extract_boxed, extract_gsm8k

__all__ = ["DataError", "Problem", "iter_rows", "load_gsm8k", "load_math", "read_rows"]

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


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a .jsonl (blank lines skipped) or .parquet file; DataError on bad files or lines."""
    return [row for _, row in iter_rows(path)]


def _text(row: dict, field: str) -> str | None:
    v = row.get(field)
    if v is None:
        return None
    v = str(v)
    return v if v.strip() else None


def _load(path: str | Path, parse_row, source: str, skip_invalid: bool) -> list[Problem]:
    path = Path(path)
    out, skipped = [], []
    for lineno, row in iter_rows(path):
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
    """MATH / MATH-500 rows: gold = `answer` if the row has one, else the last \\boxed{} of `solution`.

    A row without a problem or an answer raises DataError, or with skip_invalid=True is skipped (logged).
    """
    return _load(path, _math_row, source, skip_invalid)


def load_gsm8k(path: str | Path, source: str = "gsm8k", skip_invalid: bool = False) -> list[Problem]:
    """GSM8K rows: prompt = `question`, gold = the number after `#### ` in `answer` (normalised)."""
    return _load(path, _gsm8k_row, source, skip_invalid)
