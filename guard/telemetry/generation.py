"""Per-request traces and metrics through the OpenTelemetry API (no SDK needed here).

One ``guard.generation`` span per request, started by the service when it accepts the request
(on the event loop, so it is a child of whatever span is current there) and ended when the record
is final (a cancelled or failed generation: when its job leaves the engine worker). The controller
runs on the worker thread, where the request's context is not current: every child span is started
with the request span's context passed explicitly.

Child spans, all direct children of ``guard.generation``:

- ``guard.prefill``: the prompt's forward pass and its prompt-scope scoring;
- ``guard.monitor.fire``: one per firing (zero length), with the monitor, action, scope, position,
  score, threshold and the token it fired on;
- ``guard.rollback``: one per cut (from, to, retracted characters and tokens, monitor);
- ``guard.resample``: one per retry, open from the new strategy until that attempt ends (a later
  rollback, or the request's end), with the strategy (seed, temperature, top_p, banned count, steer);
- ``guard.deliberation``: the reasoning section, open tag to close tag.

Metrics (attributes in brackets): counters ``guard.requests`` [policy, outcome], ``guard.tokens``
[policy, kind = prompt | output | sampled | discarded], ``guard.monitor.firings`` [policy, monitor,
action, scope], ``guard.resets`` [policy, monitor, outcome], ``guard.retries`` [policy, outcome],
``guard.refusals`` [policy, reason]; histograms (seconds) ``guard.time_to_first_token`` [policy]
(until the first text is released to the client, hold-back included), ``guard.request.duration``
[policy, outcome] and ``guard.monitor.time_per_token`` [policy, monitor, scope] (one point per
request and monitor: the monitor's measured scoring time divided by the tokens it scored). Outcome
is ``clean``, ``recovered``, ``refused``, ``cancelled`` (client gone), ``interrupted`` (a drain ran out
of time on a flagged generation) or ``error``.

Cost: spans and metric points are made per request and per decision, never per token; the only
per-step call is :meth:`GenerationTrace.monitor_time`, which adds two numbers to a dict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

import guard
from guard.controller.actions import acts
from guard.controller.events import Event, TextDelta
from guard.controller.record import Firing, GenerationRecord, RetryStrategy
from guard.controller.trace import GenerationTrace
from guard.telemetry.request_log import REQUEST_LOGGER

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MONITOR_SECONDS_BUCKETS = (
    1e-6,
    2.5e-6,
    5e-6,
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    1e-2,
)


class _Instruments:
    """The metric instruments, created once per :class:`Telemetry`."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.requests = meter.create_counter(
            "guard.requests", description="Finished guarded generations"
        )
        self.tokens = meter.create_counter(
            "guard.tokens",
            description="Tokens by kind: prompt, output (the "
            "answer), sampled (all, discarded included), discarded (rolled back)",
        )
        self.firings = meter.create_counter("guard.monitor.firings", description="Monitor firings")
        self.resets = meter.create_counter(
            "guard.resets", description="Rollbacks (a monitor fired and acted)"
        )
        self.retries = meter.create_counter(
            "guard.retries", description="Resamples after a rollback"
        )
        self.refusals = meter.create_counter(
            "guard.refusals", description="Answers replaced by the refusal"
        )
        self.ttft = meter.create_histogram(
            "guard.time_to_first_token",
            unit="s",
            description="Request accepted to first text released",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.duration = meter.create_histogram(
            "guard.request.duration",
            unit="s",
            description="Request accepted to generation finished",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.monitor_time = meter.create_histogram(
            "guard.monitor.time_per_token",
            unit="s",
            description="Monitor scoring time per scored token",
            explicit_bucket_boundaries_advisory=MONITOR_SECONDS_BUCKETS,
        )


class Telemetry:
    """Tracer, meter and instruments for guarded generations; the service holds one.

    ``tracer_provider`` / ``meter_provider`` default to the global ones, which are the API's no-op
    providers until an SDK is configured (a global provider can be set only once per process, so
    tests and the server pass their own). ``log_content`` puts prompt and answer text in the
    request log line and the text of the token a monitor fired on in its span (off by default:
    spans and log lines then carry ids and counts only).
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        log_content: bool = False,
    ) -> None:
        self.tracer = trace.get_tracer("guard", guard.__version__, tracer_provider=tracer_provider)
        self.meter = metrics.get_meter("guard", guard.__version__, meter_provider=meter_provider)
        self.instruments = _Instruments(self.meter)
        self.log_content = log_content
        self.request_log = logging.getLogger(REQUEST_LOGGER)

    def generation(self, record: GenerationRecord) -> GenerationTrace:
        """Start the ``guard.generation`` span of ``record``'s request (a child of the current context)."""
        return _LiveTrace(self, record)


class _LiveTrace(GenerationTrace):
    """A request's spans and measurements, turned into metrics and a log line at :meth:`end`."""

    def __init__(self, tel: Telemetry, record: GenerationRecord) -> None:
        self._tel = tel
        self._started = time.perf_counter()
        self._first_text: float | None = None
        self._monitor_time: dict[tuple[str, str], list[float]] = {}
        self._error: BaseException | None = None
        self._ended = False
        self.span = tel.tracer.start_span(
            "guard.generation",
            attributes={
                "guard.request_id": record.request_id,
                "guard.policy": record.policy_name,
                "guard.policy_hash": record.policy_hash,
                "guard.model": record.model,
                "guard.prompt_tokens": record.prompt_tokens,
            },
        )
        self._context = trace.set_span_in_context(self.span)
        self._prefill: Span | None = None
        self._attempt: Span | None = None
        self._deliberation: Span | None = None

    def _child(self, name: str, attributes: dict[str, Any], start_time: int | None = None) -> Span:
        return self._tel.tracer.start_span(
            name, context=self._context, attributes=attributes, start_time=start_time
        )

    def watch(self, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        def watched(event: Event) -> None:
            if self._first_text is None and isinstance(event, TextDelta) and event.text:
                self._first_text = time.perf_counter()
            emit(event)

        return watched

    @contextmanager
    def prefill(self, prompt_tokens: int) -> Iterator[None]:
        self._prefill = span = self._child("guard.prefill", {"guard.prompt_tokens": prompt_tokens})
        try:
            yield
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        finally:
            if self._prefill is not None:  # a refusal at the prompt has ended it already
                self._prefill = None
                span.end()

    def monitor_time(self, monitor: str, scope: str, seconds: float, tokens: int) -> None:
        acc = self._monitor_time.get((monitor, scope))
        if acc is None:
            self._monitor_time[(monitor, scope)] = [seconds, tokens]
        else:
            acc[0] += seconds
            acc[1] += tokens

    def firing(self, firing: Firing) -> None:
        attrs = {
            "guard.monitor": firing.monitor,
            "guard.action": firing.action,
            "guard.scope": firing.scope,
            "guard.position": firing.position,
            "guard.score": float(firing.score),
            "guard.token_id": firing.token_id,
            "guard.attempt": firing.attempt,
        }
        if firing.threshold is not None:
            attrs["guard.threshold"] = float(firing.threshold)
        if self._tel.log_content:  # the token's text is prompt or answer content
            attrs["guard.token"] = firing.token
        self._child("guard.monitor.fire", attrs).end()

    def rollback(
        self,
        monitor: str,
        cut_from: int,
        cut_to: int,
        retracted_chars: int,
        retracted_tokens: int,
        start_ns: int,
    ) -> None:
        self._end_attempt()
        self._child(
            "guard.rollback",
            {
                "guard.monitor": monitor,
                "guard.rollback.from": cut_from,
                "guard.rollback.to": cut_to,
                "guard.rollback.retracted_chars": retracted_chars,
                "guard.rollback.retracted_tokens": retracted_tokens,
            },
            start_time=start_ns,
        ).end()

    def resample(self, retry: RetryStrategy, deliberate: bool) -> None:
        self._end_attempt()
        attrs: dict[str, Any] = {
            "guard.retry": retry.retry,
            "guard.seed": retry.seed,
            "guard.temperature": retry.temperature,
            "guard.top_p": retry.top_p,
            "guard.banned_count": len(retry.banned_first_tokens),
            "guard.deliberate": deliberate,
        }
        if retry.steer:
            attrs.update(
                {
                    "guard.steer.monitor": retry.steer.monitor,
                    "guard.steer.layer": retry.steer.layer,
                    "guard.steer.alpha": float(retry.steer.alpha),
                }
            )
        self._attempt = self._child("guard.resample", attrs)

    def deliberation_opened(self, trigger: str) -> None:
        self._deliberation = self._child(
            "guard.deliberation", {"guard.deliberation.trigger": trigger}
        )

    def deliberation_closed(self, reasoning_tokens: int, forced_tokens: int, capped: bool) -> None:
        if self._deliberation is None:
            return
        self._deliberation.set_attributes(
            {
                "guard.reasoning_tokens": reasoning_tokens,
                "guard.reasoning.forced_tokens": forced_tokens,
                "guard.reasoning.capped": capped,
            }
        )
        self._deliberation.end()
        self._deliberation = None

    def failed(self, record: GenerationRecord, exc: BaseException) -> None:
        if not self._ended:
            self._error = exc
            self.span.record_exception(exc)
        self.end(record)

    def end(
        self, record: GenerationRecord, log_id: str | None = None, cancelled: bool = False
    ) -> None:
        if self._ended:
            return
        self._ended = True
        duration = time.perf_counter() - self._started
        ttft = None if self._first_text is None else self._first_text - self._started
        outcome = (
            "error"
            if self._error is not None
            else "cancelled"
            if cancelled and record.outcome != "interrupted"
            else record.outcome
        )
        for span in (self._prefill, self._attempt, self._deliberation):
            if span is not None:
                span.end()
        self._prefill = self._attempt = self._deliberation = None
        self._annotate(record, outcome, ttft, log_id)
        self._record_metrics(record, outcome, ttft, duration)
        self._log_line(record, outcome, ttft, duration, log_id)
        self.span.end()

    def _end_attempt(self) -> None:
        if self._attempt is not None:
            self._attempt.end()
            self._attempt = None

    def _annotate(
        self, record: GenerationRecord, outcome: str, ttft: float | None, log_id: str | None
    ) -> None:
        attrs: dict[str, Any] = {
            "guard.outcome": outcome,
            "guard.resets": len(record.spans),
            "guard.retries": len(record.retries),
            "guard.output_tokens": len(record.output_ids),
            "guard.sampled_tokens": record.sampled_tokens,
            "guard.discarded_tokens": sum(len(s.token_ids) for s in record.spans),
            "guard.reasoning_tokens": len(record.reasoning_ids),
            "guard.monitors_fired": list(record.monitors_fired),
        }
        optional = {
            "guard.finish_reason": record.finish_reason,
            "guard.log_id": log_id,
            "guard.deliberation": record.deliberation,
            "guard.ttft_s": ttft,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        self.span.set_attributes(attrs)
        if self._error is not None:
            self.span.set_status(Status(StatusCode.ERROR, str(self._error)))

    def _record_metrics(
        self, record: GenerationRecord, outcome: str, ttft: float | None, duration: float
    ) -> None:
        ins, policy = self._tel.instruments, {"policy": record.policy_name}
        ins.requests.add(1, {**policy, "outcome": outcome})
        discarded = sum(len(s.token_ids) for s in record.spans)
        for kind, n in (
            ("prompt", record.prompt_tokens),
            ("output", len(record.output_ids)),
            ("sampled", record.sampled_tokens),
            ("discarded", discarded),
        ):
            if n:
                ins.tokens.add(n, {**policy, "kind": kind})
        for f in record.firings:
            ins.firings.add(
                1, {**policy, "monitor": f.monitor, "action": f.action, "scope": f.scope}
            )
        for span in record.spans:
            ins.resets.add(1, {**policy, "monitor": span.monitor, "outcome": outcome})
        if record.retries:
            ins.retries.add(len(record.retries), {**policy, "outcome": outcome})
        if outcome == "refused":
            ins.refusals.add(1, {**policy, "reason": refusal_reason(record)})
        ins.duration.record(duration, {**policy, "outcome": outcome})
        if ttft is not None:
            ins.ttft.record(ttft, policy)
        for (monitor, scope), (seconds, tokens) in self._monitor_time.items():
            if tokens:
                ins.monitor_time.record(
                    seconds / tokens, {**policy, "monitor": monitor, "scope": scope}
                )

    def _log_line(
        self,
        record: GenerationRecord,
        outcome: str,
        ttft: float | None,
        duration: float,
        log_id: str | None,
    ) -> None:
        logger = self._tel.request_log
        level = logging.ERROR if self._error is not None else logging.INFO
        if not logger.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "log_id": log_id,
            "policy": record.policy_name,
            "policy_hash": record.policy_hash,
            "model": record.model,
            "outcome": outcome,
            "finish_reason": record.finish_reason,
            "prompt_tokens": record.prompt_tokens,
            "output_tokens": len(record.output_ids),
            "sampled_tokens": record.sampled_tokens,
            "resets": len(record.spans),
            "retries": len(record.retries),
            "monitors_fired": list(record.monitors_fired),
            "ttft_s": None if ttft is None else round(ttft, 6),
            "duration_s": round(duration, 6),
        }
        if self._error is not None:
            fields["error"] = str(self._error)
        if self._tel.log_content:
            fields["prompt"] = record.messages if record.messages is not None else record.prompt
            fields["output"] = record.final_text
        logger.log(level, "request", extra={"guard_fields": fields})


def refusal_reason(record: GenerationRecord) -> str:
    """Why a refused generation was refused: ``monitor_error`` (fail_closed), ``prompt`` (a firing on
    the prompt), ``refuse_action`` (a ``refuse`` monitor on the output) or ``retries_exhausted``."""
    if any(e.handling == "refused" for e in record.monitor_errors):
        return "monitor_error"
    if any(f.scope == "prompt" and acts(f.action) for f in record.firings):
        return "prompt"
    if any(f.action == "refuse" for f in record.firings):
        return "refuse_action"
    return "retries_exhausted"
