"""Which tokens of a positive completion are positive: the token-label choices probe training compares.

- ``all``: every completion token of a label-1 row is positive, every token of a label-0 row negative.
- ``from-hazard``: a label-1 row contributes only its tokens from the first hazardous token on
  (``hazard_start``); the tokens before it (an opening a benign answer could share) are left out of
  the fit, neither positive nor negative.
- ``to-hazard``: a label-1 row contributes only its tokens up to and including the first hazardous
  token: the probe is fitted to fire early, on the opening in harmful context.

A label-1 row without ``hazard_start`` (or whose offset cannot be mapped to a token boundary)
contributes all its tokens under every choice. Label-0 rows always contribute all their tokens.
Evaluation never uses these labels: every metric is row level (max over the answer).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from guard.engine.base import Engine
from guard.probe.data import Example

TokenLabels = Literal["all", "from-hazard", "to-hazard"]
TOKEN_LABELS: tuple[TokenLabels, ...] = ("all", "from-hazard", "to-hazard")


def hazard_token(engine: Engine, ex: Example) -> int | None:
    """Index, among ``ex``'s completion tokens, of the token where its harmful content begins.

    ``None`` when the row has no ``hazard_start`` or the offset does not fall on a token boundary
    (the completion's first tokens must be exactly the tokens of the text before the hazard, its
    trailing spaces stripped, which is how word-initial tokens carry their space).
    """
    if ex.hazard_start is None:
        return None
    if ex.hazard_start == 0:
        return 0
    full = engine.tokenizer.encode(ex.completion)
    head = engine.tokenizer.encode(ex.completion[: ex.hazard_start].rstrip())
    if full[: len(head)] != head or len(head) >= len(full):
        return None
    return len(head)


def hazard_tokens(engine: Engine, examples: list[Example]) -> np.ndarray:
    """:func:`hazard_token` per example, ``-1`` for ``None``."""
    return np.array(
        [-1 if (h := hazard_token(engine, ex)) is None else h for ex in examples], dtype=np.int64
    )


def token_selection(
    row: np.ndarray, labels: np.ndarray, hazard: np.ndarray, mode: TokenLabels
) -> tuple[np.ndarray, np.ndarray]:
    """``(kept token indices, their 0/1 labels)`` for fitting under ``mode``.

    ``row`` maps each token to its row (rows contiguous, in order), ``labels`` and ``hazard`` are
    per row (``hazard`` -1 where unknown).
    """
    if mode not in TOKEN_LABELS:
        raise ValueError(f"token labels must be one of {', '.join(TOKEN_LABELS)}, got {mode!r}")
    starts = np.searchsorted(row, np.arange(len(labels)))
    pos = np.arange(len(row)) - starts[row]
    h = hazard[row]
    positive = labels[row] == 1
    keep = np.ones(len(row), dtype=bool)
    if mode == "from-hazard":
        keep = ~positive | (h < 0) | (pos >= h)
    elif mode == "to-hazard":
        keep = ~positive | (h < 0) | (pos <= h)
    idx = np.flatnonzero(keep)
    return idx, labels[row[idx]]


def has_hazard(labels: np.ndarray, hazard: np.ndarray) -> bool:
    """True if some positive row has a known hazard token (so the choices differ at all)."""
    return bool(((labels == 1) & (hazard >= 0)).any())
