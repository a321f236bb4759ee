"""Events a guarded generation emits, in order, to whoever serves it.

The stream of events for one generation is: any number of :class:`TextDelta` and :class:`Reset`
events, then exactly one :class:`Finished` (or one :class:`Failed`). Text is released only once
it is past the hold-back window, so a rollback inside the window produces no event at all; a
rollback that reaches into text already released produces a :class:`Reset` telling the client how
much released text to retract, followed by the replacement text as ordinary deltas.

A generation run for a client that does not apply resets (``GuardedGeneration(retracting=False)``)
never emits a :class:`Reset`: a rollback that would reach released text ends the answer instead,
with one :class:`Cut` (the policy's refusal, to show after the text already released) and then
:class:`Finished` with ``finish_reason="content_filter"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from guard.errors import GuardError

Outcome = Literal["clean", "recovered", "refused"]
"""clean: no monitor acted; recovered: one fired and a resample passed, the final answer re-scored from
scratch by every acting monitor and passed from its first token; refused: the policy's refusal
was answered (retry budget exhausted, a ``refuse`` firing, a firing on the prompt, or a failing
monitor under fail_closed)."""

LogOutcome = Literal["clean", "recovered", "refused", "cancelled", "interrupted", "error"]
"""A logged record's outcome: a :data:`Outcome`, or cancelled (the client went away first),
interrupted (the process stopped before the generation ended, or a draining server's grace period ran
out: ``server.drain``; see ``GenerationRecord.complete``) or error (the engine failed mid-generation:
the client got a :class:`Failed` event)."""

FinishReason = Literal["stop", "length", "content_filter"]


@dataclass(frozen=True)
class TextDelta:
    """Newly released answer text (always whole UTF-8 characters)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Reset:
    """Retract the last ``retract_chars`` characters (``retract_tokens`` tokens) already released."""

    retract_tokens: int
    retract_chars: int
    monitor: str
    """Name of the monitor that fired."""
    retry: int
    """1 for the first retry after a firing, 2 for the second, ..."""
    marker: str | None = None
    """Optional text the policy asks to show where text was retracted (e.g. ``"[RESET]"``)."""


@dataclass(frozen=True)
class Cut:
    """The answer ends here: keep the ``kept_chars`` characters released so far (never retracted),
    then show ``separator + refusal`` (:attr:`text`) as a separate part."""

    refusal: str
    kept_chars: int
    monitor: str
    """Name of the monitor whose firing would have retracted released text."""
    separator: str = "\n\n"

    @property
    def text(self) -> str:
        return self.separator + self.refusal


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    """Tokens of the final answer."""
    generated_tokens: int
    """All tokens sampled, discarded ones and reasoning included (what the generation really cost)."""
    reasoning_tokens: int = 0
    """Tokens of the reasoning section (forced spec included); never part of the answer text."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finished:
    """The generation ended; ``text`` is the whole final answer the client should hold."""

    text: str
    finish_reason: FinishReason
    outcome: Outcome
    resets: int
    """How many times a monitor fired and the generation was cut back."""
    usage: Usage
    log_id: str | None = None
    """Id of the flagged-generation log record, when one was written."""
    monitors_fired: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Failed:
    """The generation failed; streams send an error event then ``[DONE]``."""

    error: GuardError


Event = TextDelta | Reset | Cut | Finished | Failed
