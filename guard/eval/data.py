"""Labelled prompts for ``guard eval``: one JSON object per line.

Fields: ``prompt`` (string, required); ``label`` (``harmful`` or ``benign``; ``kind`` is read as
an alias, as the organism's ``eval_prompts.jsonl`` spells it); ``category`` (optional string);
``split`` (``trained`` or ``heldout``: whether the harm category was in the probe's training data;
a harmful row without one counts as held-out, the case that matters; ignored for benign rows).
Errors name the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from guard.errors import GuardError

GROUPS = ("heldout", "trained", "benign")
"""Report groups: harmful held-out categories, harmful trained categories, benign prompts."""


class EvalDataError(GuardError):
    """The labelled prompt file is malformed."""


@dataclass(frozen=True)
class LabelledPrompt:
    prompt: str
    harmful: bool
    category: str | None
    group: str
    """One of :data:`GROUPS`."""


def load_prompts(path: str | Path, limit: int | None = None) -> list[LabelledPrompt]:
    """Read the file; ``limit`` keeps ``limit`` rows of each group, taken from its categories in turn
    (each category's rows in file order), so every category is kept."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    rows: list[LabelledPrompt] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rows.append(_row(path, n, line))
    if not rows:
        raise EvalDataError(f"{path}: no prompts")
    if limit is not None:
        rows = [r for g in GROUPS for r in _spread([x for x in rows if x.group == g], limit)]
    return rows


def _spread(rows: list[LabelledPrompt], n: int) -> list[LabelledPrompt]:
    """``n`` of ``rows``, one category at a time in turn (all of them if there are no more than ``n``);
    returned in file order."""
    if n >= len(rows):
        return rows
    queues: dict[str | None, list[int]] = {}
    for i, r in enumerate(rows):
        queues.setdefault(r.category, []).append(i)
    picked: list[int] = []
    while len(picked) < n:
        for q in queues.values():
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return [rows[i] for i in sorted(picked)]


def _row(path: Path, n: int, line: str) -> LabelledPrompt:
    where = f"{path}:{n}"
    try:
        d = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(d, dict):
        raise EvalDataError(f"{where}: expected a JSON object")
    prompt = d.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvalDataError(f"{where}: prompt: a non-empty string is required")
    label = d.get("label", d.get("kind"))
    if label not in ("harmful", "benign"):
        raise EvalDataError(f"{where}: label: must be harmful or benign, got {label!r}")
    category = d.get("category")
    if category is not None and not isinstance(category, str):
        raise EvalDataError(f"{where}: category: must be a string")
    split = d.get("split")
    if label == "benign":
        group = "benign"
    elif split in (None, "heldout"):
        group = "heldout"
    elif split == "trained":
        group = "trained"
    else:
        raise EvalDataError(
            f"{where}: split: must be trained or heldout for a harmful prompt, got {split!r}"
        )
    return LabelledPrompt(prompt, label == "harmful", category, group)
