"""Token positions: one coordinate system, and the only place offsets are converted.

A *position* is absolute: an index into ``Sequence.tokens``, prompt first. Everything else is an
*index* relative to a start, converted here:

- output index ``i``: ``tokens[prompt_len + i]``, what the engine appended after the prompt
  (a reasoning section included);
- answer index ``j``: ``tokens[answer_start + j]``, the answer past any reasoning section: what
  monitors score, rollbacks cut, firings record and clients receive.

The controller keeps the answer start as an output index (``base``); ``Sequence.answer_start``
holds it as a position, or ``None`` while a reasoning section is open.
"""

from __future__ import annotations


def answer_start(prompt_len: int, base: int) -> int:
    """The position of answer index 0, given the answer start ``base`` as an output index."""
    return prompt_len + base


def position(start: int, index: int) -> int:
    """The position of ``index`` counted from the position ``start``."""
    return start + index


def index(start: int, pos: int) -> int:
    """The index, counted from the position ``start``, of the position ``pos``."""
    return pos - start


def scoring_start(answer_start: int | None, prompt_len: int) -> int:
    """Where answer scoring starts: the answer start, or the prompt end while none is set."""
    return prompt_len if answer_start is None else answer_start
