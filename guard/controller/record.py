"""The controller's explicit state, as data: what was sampled, discarded, and why.

A :class:`GenerationRecord` is built up by the controller while it runs and is the unit the
flagged-generation log stores. Invariants:

- ``output_ids`` is the accepted output; ``final_text`` is what the client ends up holding.
- ``output_ids`` and ``final_text`` are the answer only; the reasoning section (open tag through
  close tag, forced spec included) is in ``reasoning_ids`` / ``reasoning`` and never reaches the
  client;
- every token ever sampled is in ``output_ids``, in ``reasoning_ids`` (less its
  ``reasoning_forced_tokens``) or in exactly one ``spans[i].token_ids``
  (refusal text added by the policy is not sampled and appears in neither; a refusal mid-answer,
  by a ``refuse`` firing or a failing monitor under fail_closed, discards the whole output as one
  span attributed to that monitor);
- ``spans[i].scores[m]`` has one raw score per token of ``spans[i].token_ids`` for each monitor
  ``m`` that scored them (the last token of a span may lack a score: see the one-step lag; a span
  cut by a failing monitor lacks that monitor's scores from the failed position on);
- ``retries[i]`` is the strategy used after the ``i``-th firing;
- ``outcome`` is ``cancelled`` when the client went away before the end (the record holds what was
  generated until then) and ``interrupted`` in a checkpoint (``complete`` False) of a generation
  still running, or one the process never finished (killed, or not drained in time).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from guard.controller.events import FinishReason, LogOutcome

FiringScope = Literal["prompt", "output", "recheck"]
"""Where a firing was found: the prompt (at prefill), the output, or the from-scratch re-check of
an answer about to be accepted after a rollback."""


@dataclass(frozen=True)
class Firing:
    """One monitor firing, in the order they happened (``action="shadow"`` firings changed nothing)."""

    monitor: str
    action: str
    """``backtrack``, ``refuse`` or ``shadow`` (a log-only monitor: recorded, changed nothing)."""
    scope: FiringScope
    position: int
    """Index of the token it fired on: in the prompt for scope ``prompt``, else in the output."""
    token_id: int
    token: str
    score: float
    """The aggregated score (for the garble check: the resample's mean surprisal)."""
    threshold: float | None = None
    """The threshold in effect (stricter after the monitor fired); ``None`` in records older than it."""
    attempt: int = 0
    """0 for the first attempt, i for the i-th retry."""


@dataclass(frozen=True)
class MonitorError:
    """A monitor that raised, or returned a wrong or non-finite score, while scoring."""

    monitor: str
    scope: str
    """``prompt`` or ``output``."""
    error: str
    position: int
    attempt: int
    handling: Literal["refused", "disabled"]
    """``refused``: the generation was refused (fail_closed); ``disabled``: the monitor was switched
    off for the rest of the generation (fail_open)."""


@dataclass(frozen=True)
class Steer:
    """A resample that subtracted a monitor's direction from the residual stream."""

    monitor: str
    layer: int
    alpha: float


@dataclass(frozen=True)
class GarbleCheck:
    """The garble check of one resample (:class:`guard.controller.garble.GarbleVerdict`)."""

    mean_surprisal: float
    """Mean surprisal (nats per token) of the checked resampled tokens."""
    reference: float
    """Mean surprisal of the first attempt's tokens."""
    tokens: int
    suspect: bool


@dataclass
class DiscardedSpan:
    """Tokens cut away by one rollback, with the scores that condemned them."""

    attempt: int
    """0 for the first attempt, i for the i-th retry."""
    start: int
    """Output index of the span's first token (the rollback point)."""
    token_ids: list[int]
    text: str
    tokens: list[str]
    """Each token decoded on its own, for token-by-token display."""
    scores: dict[str, list[float]]
    """Monitor -> raw per-token scores of the span's tokens."""
    aggregated: dict[str, list[float]]
    """Monitor -> aggregated scores (what the threshold is compared with)."""
    monitor: str
    """The monitor that fired."""
    threshold: float
    fired_at: int
    """Output index of the token at which the monitor fired."""
    fired_token_id: int
    fired_token: str
    retracted_chars: int
    """Characters of this span already released to the client and retracted by a reset event."""


@dataclass
class RetryStrategy:
    """How the generation was resampled after a firing."""

    retry: int
    seed: int
    temperature: float
    top_p: float
    banned_first_tokens: list[int]
    """Token ids banned at the rollback point for the first resampled token."""
    steer: Steer | None = None
    """Set when the resample subtracted a monitor direction."""
    garble: GarbleCheck | None = None
    """The garble check of this resample; ``None`` if it was not checked."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetryStrategy:
        """The strategy :func:`dataclasses.asdict` gave (as the log stores it)."""
        steer = data.get("steer")
        garble = data.get("garble")
        return cls(
            **{
                **data,
                "steer": None if steer is None else Steer(**steer),
                "garble": None if garble is None else GarbleCheck(**garble),
            }
        )


@dataclass
class GenerationRecord:
    """Everything the log keeps about one generation."""

    request_id: str
    policy_name: str
    policy_hash: str
    model: str
    messages: list[dict[str, Any]] | None
    prompt: str | None
    prompt_tokens: int
    created: float = field(default_factory=time.time)
    output_ids: list[int] = field(default_factory=list)
    final_text: str = ""
    outcome: LogOutcome = "clean"
    finish_reason: FinishReason | None = None
    spans: list[DiscardedSpan] = field(default_factory=list)
    retries: list[RetryStrategy] = field(default_factory=list)
    sampled_tokens: int = 0
    """Every token sampled, discarded ones included."""
    final_scores: dict[str, list[float]] = field(default_factory=dict)
    """Monitor -> raw per-token scores of the accepted output."""
    monitors_fired: list[str] = field(default_factory=list)
    firings: list[Firing] = field(default_factory=list)
    """Every firing, in order."""
    prompt_scores: dict[str, list[float]] = field(default_factory=dict)
    """Monitor -> raw per-token scores of the prompt, for monitors with prompt scope."""
    monitor_errors: list[MonitorError] = field(default_factory=list)
    """Monitors that failed while scoring, in order."""
    seed: int | None = None
    """Seed of the first attempt (drawn at random when the request gave none)."""
    deliberation: str | None = None
    """Why the answer deliberated: ``"always"``, ``"on_risk"`` (the risk monitor fired), ``"retry"`` (a
    ``deliberate`` strategy), ``"model"`` (the model opened its own section); ``None``: it did not."""
    reasoning: str = ""
    """Text of the reasoning section, tags and forced spec included (special tokens spelled out)."""
    reasoning_ids: list[int] = field(default_factory=list)
    reasoning_forced_tokens: int = 0
    """Tokens of ``reasoning_ids`` forced by the controller (opener and spec, a capped close tag)."""
    complete: bool = True
    """False for a checkpoint written while the generation was still running (outcome ``interrupted``
    until the generation ends and its record is rewritten; a crash leaves it so)."""

    def checkpoint(self, output_ids: list[int], final_text: str) -> GenerationRecord:
        """A deep copy to store while the generation runs: the answer so far, outcome ``interrupted``."""
        return GenerationRecord.from_dict(
            {
                **self.to_dict(),
                "output_ids": list(output_ids),
                "final_text": final_text,
                "outcome": "interrupted",
                "finish_reason": None,
                "complete": False,
            }
        )

    def snapshot(self) -> GenerationRecord:
        """A deep copy (the controller keeps mutating the original)."""
        return GenerationRecord.from_dict(self.to_dict())

    @property
    def progress(self) -> int:
        """Changes worth a new checkpoint: the first firing, each discarded span, each monitor error
        (later firings of a shadow monitor, which may fire on every token, wait for the next one)."""
        return min(len(self.firings), 1) + len(self.spans) + len(self.monitor_errors)

    @property
    def flagged(self) -> bool:
        """A monitor fired (log-only firings included), a monitor failed, or the answer was not clean."""
        return bool(self.spans or self.firings or self.monitor_errors) or self.outcome != "clean"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationRecord:
        """The record :meth:`to_dict` gave, its nested records rebuilt from their dicts."""
        return cls(
            **{
                **data,
                "spans": [DiscardedSpan(**s) for s in data.get("spans", ())],
                "retries": [RetryStrategy.from_dict(r) for r in data.get("retries", ())],
                "firings": [Firing(**f) for f in data.get("firings", ())],
                "monitor_errors": [MonitorError(**e) for e in data.get("monitor_errors", ())],
            }
        )
