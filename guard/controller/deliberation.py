"""Deliberation: the reasoning section of an answer, and how the controller finds its end.

With deliberation on, an answer is ``OPEN reasoning CLOSE answer``. The reasoning section runs
from the open tag through the close tag; it is never released to the client, is not part of
``Finished.text``, is not scored by output monitors, and is stored in the record beside the
answer. Where the spec is *forced* (``placement: reasoning``) the controller appends the tokens of
:func:`forced_prefix` to the sequence at the start of the answer; the model then reasons and
closes the section itself (or the controller forces the close tag after ``max_reasoning_tokens``
sampled reasoning tokens).

Tags are matched on the text of the tokens as the tokenizer spells them one by one (special
tokens included), so a tag may be a special token (``<|think|>``) or plain text (``<think>``).
User text can never open or close the section: chat content is neutralised before it reaches
the model (:func:`neutralise_text`, and the engine tokenizes content with special tokens split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from guard.neutralise import neutralise_text  # noqa: F401 - re-exported (tests import it from here)

DEFAULT_INSTRUCTION = "Before answering, decide which rules of this policy apply to the request."

Placement = Literal["reasoning", "system"]


def forced_prefix(open_tag: str, instruction: str, spec: str) -> str:
    """Text forced at the start of a deliberating answer: ``OPEN instruction \\n spec \\n``."""
    return f"{open_tag}{instruction}\n{spec.strip()}\n"


def system_prompt(instruction: str, spec: str) -> str:
    """System message carrying the spec for ``placement: system`` (reasoning models)."""
    return f"{instruction}\n{spec.strip()}"


@dataclass(frozen=True)
class DeliberationConfig:
    """The policy's ``deliberation`` section, as the controller needs it."""

    mode: Literal["off", "always", "on_risk"]
    spec: str
    instruction: str
    placement: Placement
    open_tag: str
    close_tag: str
    max_reasoning_tokens: int
    """Sampled reasoning tokens (the forced prefix not counted) before the close tag is forced."""
    risk_monitor: str | None
    """Prompt-scope monitor whose firing switches deliberation on (``on_risk``); it never refuses."""

    def __post_init__(self) -> None:
        if self.mode == "on_risk" and not self.risk_monitor:
            raise ValueError(
                "DeliberationConfig.mode 'on_risk' needs DeliberationConfig.risk_monitor"
            )
        if self.max_reasoning_tokens < 1:
            raise ValueError("DeliberationConfig.max_reasoning_tokens must be >= 1")


@dataclass
class ReasoningSection:
    """Where the reasoning section lies in the output, while it is parsed token by token.

    ``start`` is the output index of the first token of the section (the open tag); ``end`` is
    the index just past the close tag once seen (the answer starts there), else ``None``.
    """

    start: int
    forced_tokens: int = 0
    """Tokens the controller forced (prefix and, when capped, the close tag)."""
    end: int | None = None
    capped: bool = False
    """The close tag was forced because ``max_reasoning_tokens`` ran out."""

    @property
    def open(self) -> bool:
        return self.end is None


def find_close(pieces: list[str], close_tag: str, after_chars: int = 0) -> int | None:
    """Number of pieces up to and including the one that completes ``close_tag``, or ``None``.

    ``pieces`` are the token texts of the section; the search starts at character ``after_chars``
    (past the open tag, so an open tag that contains the close tag's text cannot close it).
    """
    text = "".join(pieces)
    idx = text.find(close_tag, after_chars)
    if idx < 0:
        return None
    end_char, total = idx + len(close_tag), 0
    for i, piece in enumerate(pieces):
        total += len(piece)
        if total >= end_char:
            return i + 1
    return len(pieces)
