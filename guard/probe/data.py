"""Probe training data: JSONL rows ``{"prompt": str, "completion": str, "label": 0 | 1}``.

``prompt`` is one user message (the model's chat template is applied to it); ``completion`` is the
assistant text that follows, teacher forced. ``label`` 1 marks a completion the probe should flag.
Every :class:`Example` remembers ``file:line`` so later errors can point at the row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from guard.errors import GuardError


class DataError(GuardError):
    """A probe data file is missing or has a malformed row (the message names file and line)."""

    status_code = 400
    error_type = "invalid_request_error"


class Example(NamedTuple):
    """One labelled chat turn."""

    prompt: str
    """The user message."""
    completion: str
    """The assistant text whose tokens are scored."""
    label: int
    """1: the probe should fire on this completion; 0: it should not."""
    source: str
    """``file:line`` of the row, for error messages."""


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate one JSONL file. Blank lines are skipped; anything else wrong is a
    :class:`DataError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                rows.append(_parse_row(line, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def read_files(paths: list[str | Path]) -> list[Example]:
    return [ex for p in paths for ex in read_jsonl(p)]


def _parse_row(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with prompt, completion and label")
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{where}: '{key}' must be a string")
    if not row["completion"]:
        raise DataError(f"{where}: 'completion' is empty; the probe scores completion tokens")
    label = row.get("label")
    if label not in (0, 1) or isinstance(label, (bool, float)):
        raise DataError(f"{where}: 'label' must be 0 or 1, got {label!r}")
    return Example(row["prompt"], row["completion"], int(label), where)
