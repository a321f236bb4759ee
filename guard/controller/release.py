"""When held-back answer text may be shown to the client: the stream-release rule.

Two kinds of client read a guarded stream:

- a *reset-aware* client (it opted in, see ``server/serving.py``) applies ``Reset`` events, so
  text is released as soon as it is older than the fixed hold-back window and scored by every
  activation monitor (``margin=None`` here);
- every other client never sees a reset. For it, text is released only once it has *settled*:
  it is past the fixed window, and since it was generated every acting monitor's aggregated
  score stayed below ``threshold * (1 - margin)``. A position where some acting monitor came
  within that margin (a *near miss*) holds back everything a firing there would cut, i.e. the
  output from the monitor's safe point for that position on. Should a rollback still reach text
  already released, the controller does not retract it: it ends the answer with the policy's
  refusal as a separate part (a :class:`~guard.controller.events.Cut`).

Contract of :func:`release_limit`: a pure function of the scores; it never returns more than
``scored - holdback_tokens`` and, when ``margin`` is set, never more than the safe point of the
last near miss at or after ``sent`` (positions before ``sent`` are already shown and cannot be
held any more).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from guard.monitors.base import MonitorState


@dataclass(frozen=True)
class Watched:
    """An acting monitor's scores as the release rule sees them."""

    state: MonitorState
    safe_point: Callable[[int], int]
    """Output position a firing at the given position would cut back to (the monitor's rollback rule)."""


def release_limit(*, scored: int, sent: int, holdback_tokens: int, margin: float | None,
                  watched: Sequence[Watched]) -> int:
    """How many output tokens may have been released once ``scored`` tokens are scored.

    ``scored``: tokens scored by every activation monitor; ``sent``: tokens already released.
    ``margin``: ``None`` for a reset-aware client (fixed window only), else the fraction of each
    threshold a settled score must stay below.
    """
    limit = max(0, scored - holdback_tokens)
    if margin is None or limit <= sent:
        return limit
    for w in watched:
        near = near_miss(w.state, sent, margin)
        if near is not None:
            limit = min(limit, w.safe_point(near))
    return limit


def near_miss(state: MonitorState, start: int, margin: float) -> int | None:
    """The last position ``>= start`` whose aggregated score is within ``margin`` of the threshold."""
    # The threshold in effect (a state may tighten its monitor's after a firing), else the monitor's.
    bar = getattr(state, "threshold", state.monitor.threshold) * (1.0 - margin)
    for pos in range(len(state.agg) - 1, start - 1, -1):
        if state.agg[pos] >= bar:
            return pos
    return None

