"""Probe training data: JSONL rows ``{"prompt": str, "completion": str, "label": 0 | 1}``.

``prompt`` is one user message (the model's chat template is applied to it); ``completion`` is the
assistant text that follows, teacher forced. ``label`` 1 marks a completion the probe should flag.
Every :class:`Example` remembers ``file:line`` so later errors can point at the row.

Optional fields, for rows that reproduce a logged conversation (``guard logs export --labelled``,
:mod:`guard.loop`); a row without them means exactly what it meant before:

- ``messages``: the whole chat (``[{"role", "content"}, ...]``) the completion answers; the chat
  template is applied to all of it instead of to ``prompt`` alone (``prompt`` stays for display).
- ``raw_prompt``: ``true`` when ``prompt`` was sent as plain text without the chat template
  (a ``/v1/completions`` request).
- ``context``: answer text that came before the completion (e.g. the sentence before a rollback
  point); it is teacher forced but neither scored nor labelled.
- ``source``: ``"review"`` marks a reviewed row: training always keeps it in the train split.
- ``category``: a string naming what the row is about (a harm category, a benign topic). With
  categories, ``guard probe train`` chooses layer, aggregation, method and token labels by
  leave-one-category-out cross-validation: each harm category (a category with label-1 rows) is
  held out in turn, so the choice is scored on categories the candidate never saw.
- ``hazard_start``: on a label-1 row, the character offset in ``completion`` where the harmful
  content begins (e.g. the first hazardous word). It lets training compare token-label choices
  (every token of a positive completion, or only those from / up to the hazard).

Other keys (``split``, provenance) are ignored.
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
    messages: tuple[tuple[str, str], ...] | None = None
    """``(role, content)`` of every chat message, when the row gives ``messages``."""
    raw_prompt: bool = False
    """``prompt`` is plain text, fed without the chat template."""
    context: str = ""
    """Answer text before the completion: teacher forced, not scored."""
    reviewed: bool = False
    """A reviewed row (``"source": "review"``): always trained on, its negatives calibrate."""
    category: str | None = None
    """What the row is about (a harm category or benign topic), for cross-validation by category."""
    hazard_start: int | None = None
    """Label-1 rows: character offset in ``completion`` where the harmful content begins."""

    def chat(self) -> list[dict[str, str]]:
        """The chat messages the completion answers."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}]
        return [{"role": r, "content": c} for r, c in self.messages]


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
    messages = row.get("messages")
    if messages is not None:
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise DataError(
                f'{where}: \'messages\' must be a non-empty list of {{"role": str, "content": str}}'
            )
        messages = tuple((m["role"], m["content"]) for m in messages)
    raw_prompt, context = row.get("raw_prompt", False), row.get("context", "")
    if not isinstance(raw_prompt, bool) or (raw_prompt and messages is not None):
        raise DataError(
            f"{where}: 'raw_prompt' must be true or false, and cannot go with 'messages'"
        )
    if not isinstance(context, str):
        raise DataError(f"{where}: 'context' must be a string")
    category, hazard = row.get("category"), row.get("hazard_start")
    if category is not None and (not isinstance(category, str) or not category):
        raise DataError(f"{where}: 'category' must be a non-empty string")
    if hazard is not None:
        if (
            not isinstance(hazard, int)
            or isinstance(hazard, bool)
            or not 0 <= hazard < len(row["completion"])
        ):
            raise DataError(
                f"{where}: 'hazard_start' must be a character offset into 'completion' "
                f"(0..{len(row['completion']) - 1}), got {hazard!r}"
            )
        if label != 1:
            raise DataError(f"{where}: 'hazard_start' marks harmful content; it needs 'label': 1")
    return Example(
        row["prompt"],
        row["completion"],
        int(label),
        where,
        messages,
        raw_prompt,
        context,
        row.get("source") == "review",
        category,
        hazard,
    )
