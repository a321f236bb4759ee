"""What the controller reports while it runs, as an interface it owns: the do-nothing
:class:`GenerationTrace` (:data:`NO_TRACE`). :mod:`guard.telemetry` implements it with OpenTelemetry
spans, metrics and a request log line; the controller never imports telemetry.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from guard.controller.events import Event
from guard.controller.record import Firing, GenerationRecord, RetryStrategy


class GenerationTrace:
    """What the controller reports while it runs. This base class does nothing (:data:`NO_TRACE`).

    Contract: constructed on the event loop; every other method is called on the engine worker's
    thread, in the order things happen. :meth:`end` (or :meth:`failed`) ends every span still
    open, records the metrics and writes the log line; it is called when the record is final
    (before the final event, so a client that has its answer finds it in the metrics) and again
    when the job leaves the worker, where only the first call counts.
    """

    def watch(self, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        """``emit``, noting when the first text is released (time to first token)."""
        return emit

    def prefill(self, prompt_tokens: int) -> AbstractContextManager[None]:
        """Around the prompt's prefill and prompt-scope scoring."""
        return nullcontext()

    def monitor_time(self, monitor: str, scope: str, seconds: float, tokens: int) -> None:
        """``monitor`` spent ``seconds`` scoring ``tokens`` tokens of the ``scope`` (prompt or output)."""

    def firing(self, firing: Firing) -> None:
        """A firing, as appended to ``GenerationRecord.firings``."""

    def rollback(
        self,
        monitor: str,
        cut_from: int,
        cut_to: int,
        retracted_chars: int,
        retracted_tokens: int,
        start_ns: int,
    ) -> None:
        """The answer was cut from ``cut_from`` tokens back to ``cut_to`` (work began at ``start_ns``)."""

    def resample(self, retry: RetryStrategy, deliberate: bool) -> None:
        """A new attempt starts with this strategy."""

    def deliberation_opened(self, trigger: str) -> None:
        """A reasoning section opened (``always``, ``on_risk``, ``retry``, ``model``)."""

    def deliberation_closed(self, reasoning_tokens: int, forced_tokens: int, capped: bool) -> None:
        """The reasoning section closed (or was cut short by a cancel)."""

    def failed(self, record: GenerationRecord, exc: BaseException) -> None:
        """The generation failed with ``exc``: :meth:`end` with outcome ``error``."""

    def end(
        self, record: GenerationRecord, log_id: str | None = None, cancelled: bool = False
    ) -> None:
        """``record`` is final (``log_id``: its log record, if stored); ``cancelled``: the generation
        was stopped before it finished (client gone). Only the first call counts."""


NO_TRACE = GenerationTrace()
