"""When held-back answer text may be shown to the client: the stream-release rule.

Two kinds of client read a guarded stream:

- a *reset-aware* client (it opted in, see ``server/serving.py``) applies ``Reset`` events, so
  text is released as soon as it is older than the fixed hold-back window and scored by every
  activation monitor (``margin=None`` here);
- every other client never sees a reset. For it, a token is released only once it has *settled*:
  it is past the fixed window, and since it was generated every acting monitor's aggregated score
  stayed below ``threshold * (1 - margin)``. A position where some acting monitor came within that
  margin (a *near miss*) therefore stops the release: nothing after the text already shown is
  released until the answer ends (a firing there cuts back to the released text under
  ``rollback: response`` or ``auto``, see :func:`keep_released`, to the sentence start under
  ``sentence``; past the retry budget the answer ends with the refusal). A firing with no warning
  (a score that jumps past the threshold inside the window) is therefore resampled after the
  released text under ``response`` and ``auto``; the model's own reset token withdraws all it
  wrote, released text included, so it ends the answer in a Cut. Should a rollback
  still reach text already released (a firing inside it, such as the from-scratch re-check; a
  ``sentence`` or ``tokens`` point before its end; the reset token; the refusal past the retry budget), the
  controller does not retract it: it ends the answer with the policy's refusal as a separate part
  (a :class:`~guard.controller.events.Cut`).

Contract of :func:`release_limit`: a pure function of the scores; it never returns more than
``scored - holdback_tokens``, and with ``margin`` set, no more than ``sent`` while an acting
monitor has a near miss at or after ``sent`` (positions before ``sent`` are shown already).

Released text settled under the thresholds in effect when it was released. After a firing a
monitor's threshold tightens (``retry_threshold``), so ``rollback: auto``, which keeps only text
every monitor scored below ``safe_level`` times the threshold *now* in effect, could doubt text
that settled earlier and reach into what a non-retracting client already holds: a needless
:class:`~guard.controller.events.Cut` and refusal. :func:`keep_released` clamps such a rollback
point to the released text, and ``rollback: response`` (the response start) is clamped the same
way: for such a client the response start it can still be given is the end of what it was shown.
A firing inside released text (a from-scratch re-check can fire there) still reaches it and still
ends in a Cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from guard.monitors.base import MonitorState


def release_limit(
    *,
    scored: int,
    sent: int,
    holdback_tokens: int,
    margin: float | None,
    watched: Sequence[MonitorState],
) -> int:
    """How many output tokens may have been released once ``scored`` tokens are scored.

    ``scored``: tokens scored by every activation monitor; ``sent``: tokens already released;
    ``watched``: the acting output monitors' states. ``margin``: ``None`` for a reset-aware client
    (fixed window only), else the fraction of each threshold a settled score must stay below.
    """
    limit = max(0, scored - holdback_tokens)
    if margin is None or limit <= sent:
        return limit
    if any(near_miss(state, sent, margin) is not None for state in watched):
        return sent
    return limit


def near_miss(state: MonitorState, start: int, margin: float) -> int | None:
    """The first position ``>= start`` whose aggregated score is within ``margin`` of the threshold."""
    # The threshold in effect (a state may tighten its monitor's after a firing), else the monitor's.
    bar = getattr(state, "threshold", state.monitor.threshold) * (1.0 - margin)
    return next((pos for pos in range(start, len(state.agg)) if state.agg[pos] >= bar), None)


def keep_released(point: int, fire_pos: int, sent: int) -> int:
    """The rollback point for a non-retracting client: ``point``, raised to ``sent`` (the released
    tokens), unless the firing itself is inside released text (``fire_pos < sent``): then ``point``
    (the rollback reaches released text whatever it keeps, and ends in a Cut).

    Never past ``fire_pos`` (given ``point <= fire_pos``), so the fired token is always discarded."""
    return max(point, sent) if fire_pos >= sent else point
