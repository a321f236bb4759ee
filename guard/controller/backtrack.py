"""The backtracking controller: one guarded generation, advanced one engine step at a time.

The first call prefills the prompt; monitors with scope ``prompt`` or ``both`` score the prompt
tokens there, and a ``backtrack`` or ``refuse`` firing answers with the policy's refusal before
anything is generated (a ``log`` firing is only recorded). Then, per step
(:meth:`GuardedGeneration.advance`):

1. the engine feeds the last sampled token and samples the next one;
2. monitors with scope ``output`` or ``both`` score the fed tokens (activation monitors, one step
   behind) and the new token (token-id monitors such as the reset token, at once);
3. the first firing that acts decides: ``backtrack`` cuts the output back to a safe point,
   retracts any released text past it, and changes the sampling strategy (or, past the retry
   budget, refuses); ``refuse`` retracts everything and answers the refusal at once; a ``log``
   monitor's firing is only recorded;
4. stop conditions are checked; a finishing generation first scores its last token;
5. text older than the hold-back window (and already scored) is released; for a client that does
   not apply resets (``retracting=False``) only text that has settled (:mod:`guard.controller.release`);
   for such a client ``rollback: response`` and ``auto`` keep the released text
   (:func:`~guard.controller.release.keep_released`), and a rollback that would still reach it
   ends the answer with a :class:`~guard.controller.events.Cut` instead of a reset.

Deliberation (:mod:`guard.controller.deliberation`): with ``mode: always``, or ``on_risk`` when the
risk monitor fires on the prompt, or on a retry whose strategy has ``deliberate``, the controller
forces the reasoning opener and the spec at the start of the answer; until the close tag the
steps are reasoning steps (step 1 only: no scoring, no release, end-of-sequence banned, the close
tag forced after ``max_reasoning_tokens``). The answer (what monitors score, rollbacks cut and
clients receive) starts after the close tag: ``output`` is the answer only, and every output
position the controller and the monitor states use is relative to the answer start ``base``.
A model that opens its own section (``placement: system``) is detected from the answer's first
tokens; nothing is released while they may still be the open tag.

Retries are judged at least as strictly as the first attempt (``rollback: auto`` keeps only a prefix
no acting monitor had doubts about; a kept prefix is trusted once, a second rollback after it goes
to the response start; a monitor that fired keeps a stricter threshold; a resample the
model finds far less likely than its first attempt is suspect, :mod:`guard.controller.garble`), and
an answer that had a rollback is accepted as ``recovered`` only after every acting monitor re-scores
it from scratch and passes it (:meth:`GuardedGeneration._recheck`); otherwise it is retried or refused.

A monitor that raises while scoring, or returns a non-finite score (NaN would never exceed a
threshold, so the monitor would silently be off), is handled by ``on_monitor_error``: ``fail_closed`` refuses
the generation, ``fail_open`` records the error and disables the monitor for this generation.

All decisions are recorded in :class:`~guard.controller.record.GenerationRecord`. Events go to
``emit`` in the order documented in :mod:`guard.controller.events`; ``emit`` is called on the
engine worker's thread and must not block.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from guard import positions
from guard.controller.actions import (
    ACTIONS,
    Action,
    FiringScope,
    OnMonitorError,
    Rollback,
    Scope,
    canonical_action,
    strategy_for_retry,
)
from guard.controller.deliberation import (
    DeliberationConfig,
    ReasoningSection,
    find_close,
    forced_prefix,
)
from guard.controller.events import (
    Cut,
    Event,
    Failed,
    Finished,
    FinishReason,
    Reset,
    TextDelta,
    Usage,
)
from guard.controller.garble import GarbleMonitor, SurprisalTracker
from guard.controller.record import (
    DiscardedSpan,
    Firing,
    GarbleCheck,
    GenerationRecord,
    MonitorError,
    RetryStrategy,
    Steer,
)
from guard.controller.release import keep_released, release_limit
from guard.controller.text import TextTracker
from guard.controller.trace import NO_TRACE, GenerationTrace
from guard.engine.base import Engine, MonitorRun, Sequence, StepOutput
from guard.errors import EngineError, GuardError
from guard.monitors.base import Monitor, MonitorState
from guard.sampling import SamplingParams, make_generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Strategy:
    """How to resample after a firing. ``None`` keeps the request's value."""

    temperature: float | None
    top_p: float | None
    reseed: bool
    ban_first_token: bool
    steer_alpha: float
    """Subtract ``steer_alpha`` times the firing monitor's unit direction at its layer."""
    deliberate: bool
    """Roll back to the response start and deliberate there (if not deliberating already)."""


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """The policy's backtracking and streaming settings, as the controller needs them."""

    rollback: Rollback
    rollback_tokens: int
    safe_level: float
    """``rollback: auto`` keeps the longest answer prefix in which every acting monitor's aggregated
    score stayed below ``safe_level`` times its threshold (the response start if none did)."""
    retry_threshold: float
    """Once a monitor fires, its threshold for the rest of the generation is ``retry_threshold``
    times the policy's (1: retries are judged exactly like the first attempt)."""
    garble_margin: float | None
    """A resample whose mean surprisal (nats per token, under the model's plain distribution) over its
    first ``garble_window`` tokens exceeds the first attempt's by more than this is suspect and is
    treated as a firing; ``None`` turns the check off (so does an engine that reports no surprisal)."""
    garble_window: int
    max_retries: int
    refusal: str
    strategies: tuple[Strategy, ...]
    holdback_tokens: int
    reset_marker: str | None
    release_margin: float
    """For clients that do not apply resets: text is released once every acting monitor's aggregated
    score stayed below ``threshold * (1 - release_margin)`` since it was generated."""
    cut_separator: str = "\n\n"
    """Put between released text and the refusal when a rollback would reach released text."""
    on_monitor_error: OnMonitorError
    deliberation: DeliberationConfig | None
    """``None``: never deliberate and parse no reasoning section."""

    def __post_init__(self) -> None:
        if not 0.0 < self.retry_threshold <= 1.0:
            raise ValueError(f"retry_threshold must be in (0, 1], got {self.retry_threshold}")
        if not 0.0 <= self.safe_level <= self.retry_threshold:
            raise ValueError(
                f"safe_level ({self.safe_level}) must be in [0, retry_threshold "
                f"({self.retry_threshold})]: a kept prefix must pass the stricter retry threshold"
            )
        if self.garble_window < 2:
            raise ValueError(f"garble_window must be >= 2, got {self.garble_window}")

    def strategy(self, retry: int) -> Strategy:
        """Strategy for the ``retry``-th retry (1-based); the last one repeats."""
        return strategy_for_retry(self.strategies, retry)


@dataclass(frozen=True)
class BoundMonitor:
    """A monitor as a policy uses it."""

    monitor: Monitor
    action: Action = "backtrack"
    """``shadow``: a firing is recorded and changes nothing (``log``, its earlier name, is read as ``shadow``)."""
    rollback: Rollback | None = None
    """Overrides :attr:`ControllerConfig.rollback` for this monitor's firings."""
    scope: Scope = "output"
    condemns_shown: bool = False
    """A firing condemns all the answer before it, text a plain client was already shown included
    (the model's own reset token: the model withdrew it): the cut goes to the response start for
    every client, so a plain client's answer ends in a Cut rather than continuing after it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", canonical_action(self.action))
        if self.action not in ACTIONS:
            raise ValueError(
                f"monitor action must be backtrack, refuse or shadow, got {self.action!r}"
            )

    @property
    def on_prompt(self) -> bool:
        return self.scope in ("prompt", "both")

    @property
    def on_output(self) -> bool:
        return self.scope in ("output", "both")


class MonitorFailure(Exception):
    """A monitor raised, returned the wrong number of scores or a non-finite one while scoring."""


@dataclass
class _Attempt:
    """Sampling state of the current attempt."""

    params: SamplingParams
    generator: torch.Generator
    steer: dict[int, torch.Tensor] | None = None
    banned_at: dict[int, set[int]] = field(default_factory=dict)
    """Output position -> token ids banned for the draw at that position."""


class GuardedGeneration:
    """A :class:`guard.engine.worker.Job` that generates one guarded answer."""

    group: str | None = None
    """The engine worker's turn group (the client request this generation belongs to)."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        params: SamplingParams,
        monitors: list[BoundMonitor],
        config: ControllerConfig,
        record: GenerationRecord,
        emit: Callable[[Event], None],
        on_finish: Callable[[GenerationRecord], str | None] = lambda r: None,
        trace: GenerationTrace = NO_TRACE,
        on_checkpoint: Callable[[GenerationRecord], None] = lambda r: None,
        retracting: bool = True,
    ) -> None:
        """``on_finish`` is called once with the finished record (before the final event; also with
        outcome ``cancelled`` when a flagged generation is cancelled) and returns the log id if it
        stores it; the caller decides what gets stored. ``on_checkpoint`` gets a checkpoint
        (:meth:`GenerationRecord.checkpoint`, outcome ``interrupted``) when the running generation is
        first flagged and at each new discarded span or monitor error (``record.progress``), so a
        crash loses at most what was generated since. Neither may block: they run on the engine
        worker's thread. ``trace`` gets the request's spans and measurements (:mod:`guard.telemetry`).
        ``retracting``: the consumer applies :class:`Reset` events; ``False`` releases only settled
        text and never retracts (a rollback reaching released text ends the answer with a :class:`Cut`)."""
        self.engine = engine
        self.trace = trace
        self.config = config
        self.monitors = monitors
        self.record = record
        self.emit = emit
        self.on_finish = on_finish
        self.on_checkpoint = on_checkpoint
        self._checkpointed = 0
        """``record.progress`` at the last checkpoint."""
        self.cancelled = False
        self.retracting = retracting
        self._cut_by: str | None = None
        """Set when a rollback reached released text of a non-retracting stream: the monitor's name."""
        self.states = {b.monitor.name: b.monitor.new_state() for b in monitors}
        layers = {b.monitor.layer for b in monitors if b.monitor.layer is not None}
        runs = [
            MonitorRun(
                b.monitor,
                acts=b.action in ("backtrack", "refuse"),
                prompt=b.on_prompt,
                output=b.on_output,
            )
            for b in monitors
            if b.monitor.layer is not None
        ]
        self.seq: Sequence = engine.new_sequence(prompt_ids, layers, runs)
        # Surprisal feeds only the garble check, which judges resamples after a firing: with the
        # check off or no monitor that could fire, the engine need not compute it.
        self.seq.surprisal = config.garble_margin is not None and bool(monitors)
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        record.seed = seed
        self.attempt = _Attempt(params.with_changes(seed=seed), make_generator(seed))
        self.text = TextTracker(engine.tokenizer, params.stop)
        self.retries = 0
        self.disabled: set[str] = set()
        """Monitors switched off for this generation after an error (fail_open)."""
        self._prefilled = False
        self._finished = False
        self.delib = config.deliberation
        self.section: ReasoningSection | None = None
        self.base = 0
        """Output index where the answer starts (just past the reasoning section, if any)."""
        self._undecided = False
        """The answer so far may still be the model's own open tag: release nothing yet."""
        self._flushing: FinishReason | None = None
        """Set while the final flush waits for the engine (its step raised ``StepPending``): the
        next :meth:`advance` retries the flush, not a new step."""
        self.surprisal = SurprisalTracker(config.garble_margin, config.garble_window)
        self._resumed_at = 0
        """Where the current attempt resumed (0: the response start, also for the first attempt)."""
        self._garble = BoundMonitor(GarbleMonitor(config.garble_margin or 0.0), rollback="response")

    # -- Job interface ------------------------------------------------------------------------

    def advance(self) -> bool:
        done = self._advance()
        if not done and self.record.progress != self._checkpointed:
            self._checkpointed = self.record.progress
            self.on_checkpoint(self.record.checkpoint(self.output, self.text.text_of(self.output)))
        return done

    def _advance(self) -> bool:
        if not self._prefilled:
            self._prefilled = True
            with self.trace.prefill(len(self.seq.prompt_ids)):
                if self._prefill():
                    return True
            if self.cancelled:
                return False  # the worker drops it before its next turn
            # The first step follows in the same turn: an engine that generates ahead (vLLM) gets
            # the request one worker pass sooner, which is the first token's latency.
        if self._flushing is not None:
            return self._finish_after_flush(self._flushing)
        if self.section is not None and self.section.open:
            return self._reason()
        banned = frozenset(self.attempt.banned_at.get(len(self.output), ()))
        out = self.engine.step(
            self.seq,
            self.attempt.params,
            self.attempt.generator,
            extra_banned=banned,
            steer=self.attempt.steer,
        )
        if out.token_id is None:
            # An engine that runs monitors stopped early: they fired on the fed tokens. The same
            # scores fire the controller's own states; if they do not, the next step samples.
            self._score(out, new_token=False)
            return self._finished
        self.record.sampled_tokens += 1
        self.surprisal.sampled(len(self.output) - 1, out.surprisal)
        if self._score(out, new_token=True):
            return self._finished
        if self._detect_section():
            return False
        if self._garbled(finishing=False):
            return self._finished
        reason = self._stop_reason()
        if reason is not None:
            return self._finish_after_flush(reason)
        self._release()
        return False

    def fail(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, GuardError) else EngineError(f"generation failed: {exc}")
        self._finished = True
        if (
            self.record.flagged
        ):  # its checkpoint says interrupted: the final record says what happened
            try:
                self._end_unfinished("error")
            except Exception:  # the client must still get its Failed event
                log.exception("recording the failed generation %s failed", self.record.request_id)
        self.trace.failed(self.record, exc)
        self.emit(Failed(err))

    def close(self) -> None:
        self.engine.release(self.seq)
        log_id = None
        if self.cancelled and not self._finished and self.record.flagged:
            log_id = self._end_unfinished("cancelled")
        self.trace.end(self.record, log_id, cancelled=self.cancelled and not self._finished)

    def _end_unfinished(self, outcome: Literal["cancelled", "error"]) -> str | None:
        """Record what was generated until a cancellation or an engine failure, and store it."""
        if self.section is not None and self.section.open:  # ended mid-reasoning: no answer yet
            self.section.end = self.base = len(self.seq.output_ids)
            self._store_reasoning()
        self.record.output_ids = list(self.output)
        self.record.final_text = self.text.text_of(self.output)
        self.record.outcome, self.record.finish_reason = outcome, None
        return self.on_finish(self.record)

    # -- phases -------------------------------------------------------------------------------

    @property
    def output(self) -> list[int]:
        """The answer: output tokens past the reasoning section."""
        return self.seq.output_ids[self.base :]

    # -- deliberation -------------------------------------------------------------------------

    def _open_section(self, trigger: str) -> None:
        """Force the opener and spec at the current answer start (which must be empty)."""
        d = self.delib
        assert d is not None  # a section opens only under a deliberation config
        ids = self.engine.tokenizer.encode(forced_prefix(d.open_tag, d.instruction, d.spec))
        self.section = ReasoningSection(start=len(self.seq.output_ids), forced_tokens=len(ids))
        self.seq.tokens.extend(ids)
        self.base = len(self.seq.output_ids)
        self.seq.answer_start = None  # nothing sampled is answer until the section closes
        self.record.deliberation = trigger
        self.trace.deliberation_opened(trigger)

    def _reason(self) -> bool:
        """One reasoning step: sample, look for the close tag, force it past the budget."""
        sec, d = self.section, self.delib
        assert sec is not None and d is not None  # called only while a section is open
        eos = frozenset(self.engine.info.eos_token_ids) | frozenset(
            self.attempt.params.stop_token_ids
        )
        params = self.attempt.params.with_changes(
            banned_token_ids=self.attempt.params.banned_token_ids | eos
        )
        if self.engine.step(self.seq, params, self.attempt.generator).token_id is None:
            return False
        self.record.sampled_tokens += 1
        ids = self.seq.output_ids[sec.start :]
        n = find_close(
            [self.text.token_text(t) for t in ids], d.close_tag, after_chars=len(d.open_tag)
        )
        if n is not None:
            # Text after the tag inside the same token (plain-text tags only) is dropped with it.
            sec.end = sec.start + n
        elif len(ids) - sec.forced_tokens >= d.max_reasoning_tokens:
            close = self.engine.tokenizer.encode(d.close_tag)
            self.seq.tokens.extend(close)
            sec.forced_tokens += len(close)
            sec.capped = True
            sec.end = len(self.seq.output_ids)
        if sec.end is not None:
            self.base = sec.end
            self.seq.answer_start = positions.answer_start(self.seq.prompt_len, self.base)
            self._store_reasoning()
        return False

    def _detect_section(self) -> bool:
        """Detect a section the model opens itself at the answer start; True if one just opened."""
        if self.delib is None or self.section is not None or self.text.sent_tokens:
            self._undecided = False
            return False
        text = "".join(self.text.token_text(t) for t in self.output)  # special tokens spelled out
        text, tag = text.lstrip(), self.delib.open_tag
        self._undecided = len(text) < len(tag) and tag.startswith(text)
        if not text.startswith(tag):
            return False
        self._undecided = False
        self.section = ReasoningSection(start=0)
        self.record.deliberation = self.record.deliberation or "model"
        self.trace.deliberation_opened("model")
        for state in self.states.values():
            state.truncate(0)  # the tag tokens were scored as answer tokens: they are not
        n = find_close(
            [self.text.token_text(t) for t in self.output],
            self.delib.close_tag,
            after_chars=len(tag),
        )
        if n is not None:
            self.section.end = self.base = n
            self._store_reasoning()
        self.seq.answer_start = (
            positions.answer_start(self.seq.prompt_len, self.base) if n is not None else None
        )
        return True

    def _store_reasoning(self) -> None:
        sec, rec = self.section, self.record
        assert sec is not None  # called when a section closes
        ids = self.seq.output_ids[sec.start : sec.end]
        rec.reasoning_ids = list(ids)
        rec.reasoning = "".join(self.text.token_text(t) for t in ids)
        rec.reasoning_forced_tokens = sec.forced_tokens
        self.trace.deliberation_closed(len(ids), sec.forced_tokens, sec.capped)

    def _prefill(self) -> bool:
        """Prefill and score the prompt with prompt-scope monitors; True if the answer is a refusal."""
        on_prompt = [b for b in self.monitors if b.on_prompt]
        need_hidden = any(b.monitor.layer is not None for b in on_prompt)
        out = self.engine.prefill(self.seq, return_hidden=need_hidden)
        prompt = self.seq.prompt_ids
        acting = risky = False
        for bound in on_prompt:
            mon = bound.monitor
            # Prompt scores get their own state: output aggregation starts fresh, as without prompt scope.
            state = mon.new_state()
            t0 = time.perf_counter()
            try:
                if mon.layer is not None and self.engine.runs_monitors:
                    scores = _engine_scores(out, mon, len(prompt))
                else:
                    scores = _checked_score(
                        mon, out.hidden[mon.layer] if mon.layer is not None else None, prompt
                    )
            except MonitorFailure as exc:
                if self._monitor_failed(bound, "prompt", exc, 0):
                    return True
                continue
            self.trace.monitor_time(mon.name, "prompt", time.perf_counter() - t0, len(prompt))
            pos = state.extend(0, scores)
            self.record.prompt_scores[mon.name] = list(state.raw)
            if pos is not None:
                self._note_firing(bound, pos, state, "prompt")
                if self.delib is not None and mon.name == self.delib.risk_monitor:
                    risky = True  # a risk signal only: it switches deliberation on, never refuses
                else:
                    acting = acting or bound.action != "shadow"
        if acting:
            self._refuse()
        elif (
            self.delib is not None
            and self.delib.placement == "reasoning"
            and (self.delib.mode == "always" or (self.delib.mode == "on_risk" and risky))
        ):
            self._open_section(self.delib.mode)
        return acting

    def _score(self, out: StepOutput, new_token: bool) -> bool:
        """Score fed tokens (and the new token for token-id monitors); act on the first firing.

        Returns True if a firing or a monitor error changed the output (the step's other work is
        skipped).
        """
        fed_start, hidden = out.fed_start, out.hidden
        plen = positions.answer_start(self.seq.prompt_len, self.base)  # position of answer index 0
        firings: list[tuple[int, BoundMonitor]] = []
        for bound in self._output_monitors():
            mon, state = bound.monitor, self.states[bound.monitor.name]
            scores: list[float] | None = None
            if mon.layer is None:
                if not new_token:
                    continue
                start, h = len(self.output) - 1, None
                ids = self.output[start:]
            elif self.engine.runs_monitors:  # raw scores computed inside the engine
                scores = out.scores.get(mon.name, [])
                start = positions.index(plen, fed_start)
                if start < 0:  # prompt and reasoning positions are not answer tokens
                    scores, start = scores[-start:], 0
                try:
                    _engine_checked(out, mon, scores)
                except MonitorFailure as exc:
                    if self._monitor_failed(bound, "output", exc, max(start, 0)):
                        return True
                    continue
                if not scores:
                    continue
                ids = self.output[start : start + len(scores)]
            else:
                if mon.layer not in hidden:
                    continue
                start = positions.index(plen, fed_start)
                h = hidden[mon.layer]
                if start < 0:  # prompt and reasoning positions are not answer tokens
                    h, start = h[-start:], 0
                if h.shape[0] == 0:
                    continue
                ids = self.output[start : start + h.shape[0]]
            t0 = time.perf_counter()
            if scores is None:
                try:
                    scores = _checked_score(mon, h, ids)
                except MonitorFailure as exc:
                    if self._monitor_failed(bound, "output", exc, start):
                        return True
                    continue
            self.trace.monitor_time(mon.name, "output", time.perf_counter() - t0, len(ids))
            pos = state.extend(start, scores)
            if pos is not None:
                firings.append((pos, bound))
        if not firings:
            return False
        firings.sort(key=lambda f: f[0])
        for pos, bound in firings:
            self._note_firing(bound, pos, self.states[bound.monitor.name], "output")
        acting = [(pos, b) for pos, b in firings if b.action != "shadow"]
        if not acting:
            return False
        pos, bound = acting[0]
        self._act(pos, bound)
        return True

    def _act(self, pos: int, bound: BoundMonitor) -> None:
        """An acting monitor fired at output position ``pos``: refuse, or back off and resample."""
        if bound.action == "refuse":
            self._discard(pos, bound, 0)
            self._refuse()
        else:
            self._backtrack(pos, bound)

    def _output_monitors(self) -> list[BoundMonitor]:
        return [b for b in self.monitors if b.on_output and b.monitor.name not in self.disabled]

    def _monitor_failed(
        self, bound: BoundMonitor, scope: Scope, exc: MonitorFailure, pos: int
    ) -> bool:
        """Record a monitor error and apply ``on_monitor_error``; True if the generation was refused."""
        closed = self.config.on_monitor_error == "fail_closed"
        name = bound.monitor.name
        self.record.monitor_errors.append(
            MonitorError(
                monitor=name,
                scope=scope,
                error=str(exc),
                position=pos,
                attempt=self.retries,
                handling="refused" if closed else "disabled",
            )
        )
        log.warning(
            "monitor %r failed scoring the %s of %s: %s (%s)",
            name,
            scope,
            self.record.request_id,
            exc,
            "refusing: fail_closed" if closed else "disabled for this generation: fail_open",
        )
        if not closed:
            self.disabled.add(name)
            self.engine.disable_monitor(self.seq, name)
            return False
        if scope == "output" and self.output:
            # Like a refuse firing: every sampled token stays accounted for in a discarded span.
            self._discard(min(pos, len(self.output) - 1), bound, 0)
        self._refuse()
        return True

    def _note_firing(
        self, bound: BoundMonitor, pos: int, state: MonitorState, scope: FiringScope
    ) -> None:
        mon = bound.monitor
        tid = (self.seq.prompt_ids if scope == "prompt" else self.output)[pos]
        self.record.firings.append(
            Firing(
                monitor=mon.name,
                action=bound.action,
                scope=scope,
                position=pos,
                token_id=tid,
                token=self.text.token_text(tid),
                score=state.agg[pos],
                threshold=state.threshold,
                attempt=self.retries,
            )
        )
        if mon.name not in self.record.monitors_fired:
            self.record.monitors_fired.append(mon.name)
        self.trace.firing(self.record.firings[-1])

    def _backtrack(self, fire_pos: int, bound: BoundMonitor) -> None:
        """Cut back to the safe point and pick the next strategy (or refuse past the budget).

        The firing monitor's threshold becomes ``retry_threshold`` times the policy's for the rest
        of the generation: its evidence is kept across the rollback, so a resample must look
        clearly safer to it than the text it condemned, not just below the line that text crossed.

        A kept prefix is trusted once: when the attempt that resumed after it is rolled back too (a
        monitor fired on it, the garble check or the re-check), two continuations of that prefix
        were condemned, so the prefix is suspect and this rollback goes to the response start,
        whatever the rule (for a client that cannot retract, to the text it was already shown, as
        ``auto`` does: that text settled under the release margin, see
        :mod:`guard.controller.release`). A monitor that ``condemns_shown`` (the model's own reset
        token) cuts to the response start for every client: a plain client shown some of the
        withdrawn text gets a Cut and the refusal.
        """
        if bound.condemns_shown:  # the model's own reset: all of it goes, shown or not
            point = 0
        elif self._resumed_at > 0:
            point = self._safe_point(fire_pos, "response")
        else:
            point = self._safe_point(fire_pos, bound.rollback or self.config.rollback)
        if bound.monitor.name in self.states:
            self.states[bound.monitor.name].scale = self.config.retry_threshold
            self.seq.threshold_scale[bound.monitor.name] = self.config.retry_threshold
        deliberate = (
            self.delib is not None
            and self.section is None
            and self.retries < self.config.max_retries
            and self.config.strategy(self.retries + 1).deliberate
        )
        if deliberate or self.retries + 1 > self.config.max_retries:
            # Deliberation starts the response over; past the budget the refusal replaces all of
            # it, so the whole answer is the discarded span (every sampled token stays in the record).
            point = 0
        first_token = self.output[point] if point < len(self.output) else None
        self._discard(fire_pos, bound, point)
        self.retries += 1
        if self.retries > self.config.max_retries or self._cut_by is not None:
            self._refuse()
            return
        self._next_attempt(bound, point, first_token)
        if deliberate:
            self._open_section("retry")

    def _discard(self, fire_pos: int, bound: BoundMonitor, point: int) -> None:
        """Cut the output back to ``point``, retract released text past it, record the span."""
        started, sent = time.time_ns(), self.text.sent_tokens
        span_ids = self.output[point:]
        retracted = self._retract_to(point, bound.monitor.name)
        kept_chars = len(self.text.text_of(self.output[:point]))
        self.record.spans.append(
            DiscardedSpan(
                attempt=self.retries,
                start=point,
                token_ids=list(span_ids),
                text=self.text.text_of(self.output)[kept_chars:],
                tokens=[self.text.token_text(t) for t in span_ids],
                scores={n: s.raw[point:] for n, s in self.states.items() if len(s.raw) > point},
                aggregated={n: s.agg[point:] for n, s in self.states.items() if len(s.agg) > point},
                monitor=bound.monitor.name,
                threshold=bound.monitor.threshold,
                fired_at=fire_pos,
                fired_token_id=self.output[fire_pos],
                fired_token=self.text.token_text(self.output[fire_pos]),
                retracted_chars=retracted,
            )
        )
        start = positions.answer_start(self.seq.prompt_len, self.base)
        self.engine.rollback(self.seq, positions.position(start, point))
        for state in self.states.values():
            state.truncate(point)
        self.trace.rollback(
            bound.monitor.name,
            point + len(span_ids),
            point,
            retracted,
            max(0, sent - point),
            started,
        )

    def _safe_point(self, fire_pos: int, rule: Rollback) -> int:
        if rule == "response":
            # For a plain client, the response start it can still be given: the text it was shown
            # (settled under the release margin); a firing inside that text still reaches it (a Cut).
            return 0 if self.retracting else keep_released(0, fire_pos, self.text.sent_tokens)
        if rule == "auto":
            point = self._auto_point(fire_pos)
            # Released text settled under the thresholds of its time; a plain client keeps it anyway.
            return (
                point if self.retracting else keep_released(point, fire_pos, self.text.sent_tokens)
            )
        if rule == "tokens":
            return max(0, fire_pos - self.config.rollback_tokens)
        return self.text.sentence_start(self.output, fire_pos)

    def _auto_point(self, fire_pos: int) -> int:
        """The longest answer prefix, at most up to the fired token, in which every acting output
        monitor's aggregated score stayed below ``safe_level`` times its threshold in effect.

        A prefix that once came near a threshold is not kept even if the score fell back: the
        rollback keeps only text no monitor had doubts about (0, the response start, if none)."""
        point = fire_pos
        for bound in self._output_monitors():
            if bound.action == "shadow":
                continue
            state = self.states[bound.monitor.name]
            level = self.config.safe_level * state.threshold
            point = next((j for j, a in enumerate(state.agg[:point]) if a >= level), point)
        return point

    def _garbled(self, finishing: bool) -> bool:
        """Run the garble check on the current resample (:mod:`guard.controller.garble`); a suspect
        resample counts as a firing (cut back to the response start, or refused past the budget).
        True if it acted."""
        verdict = self.surprisal.check(len(self.output), finishing)
        if verdict is None:
            return False
        if self.record.retries:
            self.record.retries[-1].garble = GarbleCheck(**verdict._asdict())
        if not verdict.suspect:
            return False
        margin = self.surprisal.margin
        assert margin is not None  # check() gives no verdict without a margin
        pos, name = len(self.output) - 1, self._garble.monitor.name
        self.record.firings.append(
            Firing(
                monitor=name,
                action="backtrack",
                scope="output",
                position=pos,
                token_id=self.output[pos],
                token=self.text.token_text(self.output[pos]),
                score=verdict.mean_surprisal,
                threshold=verdict.reference + margin,
                attempt=self.retries,
            )
        )
        if name not in self.record.monitors_fired:
            self.record.monitors_fired.append(name)
        self.trace.firing(self.record.firings[-1])
        self._backtrack(pos, self._garble)
        return True

    def _recheck(self) -> bool:
        """Re-score the whole answer from scratch (one fresh forward pass, no steering, fresh
        aggregation) with every acting output monitor at the thresholds in effect.

        Called before an answer that had a rollback is accepted, so that ``recovered`` means the
        final answer passes every acting monitor from its first token. A firing acts like one
        during generation (scope ``recheck`` in the record): backtrack or refuse. True if it acted.
        """
        acting = [b for b in self._output_monitors() if b.action != "shadow"]
        out = self.output
        fresh, failed = self._rescore([b for b in acting if b.monitor.layer is not None])
        for bound, exc in failed:  # each one handled by on_monitor_error, as during generation
            if self._monitor_failed(bound, "output", exc, 0):
                return True
        firings: list[tuple[int, BoundMonitor]] = []
        for bound in acting:
            mon = bound.monitor
            if mon.name in self.disabled:
                continue
            try:
                scores = (
                    fresh.get(mon.name, [])
                    if mon.layer is not None
                    else _checked_score(mon, None, out)
                )
                if len(scores) != len(out):
                    raise MonitorFailure(
                        f"re-check returned {len(scores)} scores for {len(out)} tokens"
                    )
                _require_finite_scores(scores)  # NaN never fires: a silent pass under any setting
            except MonitorFailure as exc:
                if self._monitor_failed(bound, "output", exc, 0):
                    return True
                continue
            state = mon.new_state()
            state.scale = self.states[mon.name].scale
            pos = state.extend(0, scores)
            self.states[mon.name] = state  # the from-scratch scores are the record's from here on
            if pos is not None:
                firings.append((pos, bound))
        if not firings:
            return False
        pos, bound = min(firings, key=lambda f: f[0])
        self._note_firing(bound, pos, self.states[bound.monitor.name], "recheck")
        self._act(pos, bound)
        return True

    def _rescore(
        self, layered: list[BoundMonitor]
    ) -> tuple[dict[str, list[float]], list[tuple[BoundMonitor, MonitorFailure]]]:
        """From-scratch scores of the ``layered`` monitors and the monitors whose re-scoring raised.

        One batched pass; if it raises, each monitor is re-scored alone, so that a failing monitor
        neither takes the others' re-check with it nor is confused with them."""
        if not layered:
            return {}, []
        try:
            return self.engine.rescore(self.seq, [b.monitor for b in layered]), []
        except Exception as exc:  # noqa: BLE001 - a monitor bug is handled by on_monitor_error
            if len(layered) == 1:
                return {}, [(layered[0], MonitorFailure(f"{type(exc).__name__}: {exc}"))]
        fresh: dict[str, list[float]] = {}
        failed: list[tuple[BoundMonitor, MonitorFailure]] = []
        for bound in layered:
            try:
                fresh.update(self.engine.rescore(self.seq, [bound.monitor]))
            except Exception as exc:  # noqa: BLE001
                failed.append((bound, MonitorFailure(f"{type(exc).__name__}: {exc}")))
        return fresh, failed

    def _retract_to(self, point: int, monitor: str) -> int:
        """Emit a reset if released text reaches past ``point``; return characters retracted."""
        if self.text.sent_tokens <= point:
            return 0
        if not self.retracting:
            self._cut_by = (
                self._cut_by or monitor
            )  # the caller ends the answer with a Cut (in _refuse)
            return 0
        keep_text = self.text.text_of(self.output[:point])
        chars = len(self.text.sent_text) - len(keep_text)
        self.emit(
            Reset(
                retract_tokens=self.text.sent_tokens - point,
                retract_chars=chars,
                monitor=monitor,
                retry=self.retries + 1,
                marker=self.config.reset_marker,
            )
        )
        self.text.sent_text, self.text.sent_tokens = keep_text, point
        return chars

    def _next_attempt(self, bound: BoundMonitor, point: int, first_token: int | None) -> None:
        strat = self.config.strategy(self.retries)
        old = self.attempt
        params = old.params
        seed = params.seed
        assert seed is not None  # the first attempt's params carry the seed drawn in __init__
        if strat.reseed:
            seed = (self.record.seed or 0) + 1_000_003 * self.retries
        params = params.with_changes(
            seed=seed,
            temperature=strat.temperature if strat.temperature is not None else params.temperature,
            top_p=strat.top_p if strat.top_p is not None else params.top_p,
        )
        banned = {p: set(ids) for p, ids in old.banned_at.items() if p <= point}
        if strat.ban_first_token and first_token is not None:
            banned.setdefault(point, set()).add(first_token)
        self.surprisal.resampling(point, bool(banned.get(point)))
        self._resumed_at = point
        steer = None
        steer_info = None
        vec = bound.monitor.steering_vector() if strat.steer_alpha else None
        if vec is not None and bound.monitor.layer is not None:
            steer = {bound.monitor.layer: -strat.steer_alpha * vec}
            steer_info = Steer(
                monitor=bound.monitor.name, layer=bound.monitor.layer, alpha=strat.steer_alpha
            )
        self.attempt = _Attempt(params, make_generator(seed), steer, banned)
        self.record.retries.append(
            RetryStrategy(
                retry=self.retries,
                seed=seed,
                temperature=params.temperature,
                top_p=params.top_p,
                banned_first_tokens=sorted(banned.get(point, ())),
                steer=steer_info,
            )
        )
        self.trace.resample(self.record.retries[-1], strat.deliberate)

    def _stop_reason(self) -> FinishReason | None:
        last = self.output[-1]
        if self.attempt.params.ends(last, self.engine.info.eos_token_ids):
            return "stop"
        if self.text.stop_index(self.output) is not None:
            return "stop"
        if len(self.output) >= self.attempt.params.max_tokens:
            return "length"
        return None

    def _finish_after_flush(self, reason: FinishReason) -> bool:
        """Score the last sampled token (one-step lag), then finish unless a monitor fires.

        The flush step may raise ``StepPending`` (an engine inside a worker whose score has not
        arrived): nothing else has changed then, and the next :meth:`advance` retries it."""
        if any(b.monitor.layer is not None for b in self._output_monitors()):
            self._flushing = reason
            out = self.engine.step(
                self.seq, self.attempt.params, self.attempt.generator, sample=False
            )
            self._flushing = None
            if self._score(out, new_token=False):
                return self._finished
        if self.record.spans and (self._garbled(finishing=True) or self._recheck()):
            return self._finished
        ended_by_token = reason == "stop" and self.attempt.params.ends(
            self.output[-1], self.engine.info.eos_token_ids
        )
        keep = self.output[:-1] if ended_by_token else self.text.tokens_before_stop(self.output)
        text = self.text.text_of(keep) if ended_by_token else self.text.final_text(self.output)
        outcome = "recovered" if self.record.spans else "clean"
        self._finish(list(keep), text, reason, outcome)
        return True

    def _refuse(self) -> None:
        self._retract_to(0, self.record.spans[-1].monitor if self.record.spans else "")
        refusal = self.config.refusal
        if self._cut_by is not None:
            # Released text stays where it is (this client cannot retract); the refusal follows it.
            kept = self.text.sent_text
            cut = Cut(refusal, len(kept), self._cut_by, self.config.cut_separator)
            self.emit(cut)
            self.text.sent_text = kept + cut.text
            self._finish([], kept + cut.text, "content_filter", "refused", release=False)
            return
        self.emit(TextDelta(refusal, ()))
        self.text.sent_text = refusal
        self._finish([], refusal, "content_filter", "refused", release=False)

    def _finish(
        self, output: list[int], text: str, reason: FinishReason, outcome, release: bool = True
    ) -> None:
        rec = self.record
        rec.output_ids, rec.final_text, rec.finish_reason, rec.outcome = (
            output,
            text,
            reason,
            outcome,
        )
        rec.final_scores = {n: s.raw[: len(output)] for n, s in self.states.items()}
        if release and text != self.text.sent_text:
            if not text.startswith(
                self.text.sent_text
            ):  # cannot happen: released text is never past a stop
                raise AssertionError("released text is not a prefix of the final text")
            self.emit(
                TextDelta(text[len(self.text.sent_text) :], tuple(output[self.text.sent_tokens :]))
            )
        log_id = self.on_finish(rec)
        self.trace.end(
            rec, log_id
        )  # before the final event: a client that then reads /metrics sees it
        self._finished = True
        usage = Usage(
            prompt_tokens=self.seq.prompt_len,
            completion_tokens=len(output),
            generated_tokens=rec.sampled_tokens,
            reasoning_tokens=len(rec.reasoning_ids),
        )
        self.emit(
            Finished(
                text=text,
                finish_reason=reason,
                outcome=outcome,
                resets=len(rec.spans),
                usage=usage,
                log_id=log_id,
                monitors_fired=tuple(rec.monitors_fired),
            )
        )

    def _release(self) -> None:
        """Release text that is scored by every activation monitor and older than the hold-back."""
        if self._undecided:
            return
        scored = len(self.output)
        for bound in self._output_monitors():
            if bound.monitor.layer is not None:
                scored = min(scored, len(self.states[bound.monitor.name].raw))
        n = release_limit(
            scored=scored,
            sent=self.text.sent_tokens,
            holdback_tokens=self.config.holdback_tokens,
            margin=None if self.retracting else self.config.release_margin,
            watched=() if self.retracting else self._watched(),
        )
        if n <= self.text.sent_tokens:
            return
        delta = self.text.release(self.output, n)
        if delta is not None:
            self.emit(delta)

    def _watched(self) -> list[MonitorState]:
        """The acting output monitors' states (what the release rule for non-retracting clients reads)."""
        return [
            self.states[b.monitor.name] for b in self._output_monitors() if b.action != "shadow"
        ]


def _engine_scores(out: StepOutput, monitor: Monitor, n: int) -> list[float]:
    """The ``n`` scores an engine that runs monitors reported for ``monitor`` (MonitorFailure if not)."""
    scores = out.scores.get(monitor.name)
    _engine_checked(out, monitor, scores or [])
    if scores is None or len(scores) != n:
        raise MonitorFailure(
            f"the engine reported {0 if scores is None else len(scores)} scores for {n} tokens"
        )
    return scores


def _engine_checked(out: StepOutput, monitor: Monitor, scores: list[float]) -> None:
    """MonitorFailure if the engine reported ``monitor`` failed, or reported a non-finite score."""
    error = out.errors.get(monitor.name)
    if error is not None:
        raise MonitorFailure(error)
    _require_finite_scores(scores)


def _require_finite_scores(scores: list[float]) -> None:
    bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
    if bad is not None:
        raise MonitorFailure(
            f"returned a non-finite score ({scores[bad]}) at token {bad} of {len(scores)}"
        )


def _checked_score(
    monitor: Monitor, hidden: torch.Tensor | None, token_ids: list[int]
) -> list[float]:
    """``monitor.score``, with any exception or a wrong number of scores as :class:`MonitorFailure`."""
    try:
        scores = monitor.score(hidden, token_ids)
    except Exception as exc:  # any monitor bug is handled by the policy's on_monitor_error
        raise MonitorFailure(f"{type(exc).__name__}: {exc}") from exc
    if len(scores) != len(token_ids):
        raise MonitorFailure(f"returned {len(scores)} scores for {len(token_ids)} tokens")
    _require_finite_scores(scores)
    return scores
