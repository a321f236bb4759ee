"""Running one prepared generation on its engine worker's thread, bridged to an async iterator.

The controller (:class:`~guard.controller.backtrack.GuardedGeneration`) runs on the engine
worker's thread and calls ``emit`` there; :meth:`GenerationRunner.stream` hands each event to the
event loop through :class:`~guard.handoff.Handoff` (one loop wake-up per burst) and yields it.
Closing the iterator early (client disconnect) cancels the job.
:meth:`GenerationRunner.interrupt` ends every running stream with an error event (a draining
server past its grace period); those generations are logged with outcome ``interrupted``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from guard.controller.backtrack import GuardedGeneration
from guard.controller.events import Event, Failed, Finished
from guard.controller.record import GenerationRecord
from guard.errors import GuardError
from guard.handoff import Handoff
from guard.logstore.writer import GenerationLogging
from guard.service.prepare import PreparedGeneration
from guard.service.registry import PolicyRegistry
from guard.telemetry import Telemetry


class GenerationRunner:
    """Submits prepared generations to their engine worker and streams their events."""

    def __init__(self, registry: PolicyRegistry, telemetry: Telemetry) -> None:
        self._registry = registry
        self.telemetry = telemetry
        self._live: set[Callable[[GuardError], None]] = set()
        """One callback per running stream that ends it with an error event (:meth:`interrupt`)."""
        self._interrupting = False

    async def stream(self, prepared: PreparedGeneration) -> AsyncGenerator[Event, None]:
        """Run one guarded generation; closing this iterator early cancels it."""
        handoff = Handoff.of(asyncio.get_running_loop())
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            handoff.put(events, event)  # one loop wake-up per burst of events, not per event

        def end(err: GuardError) -> None:
            events.put_nowait(Failed(err))

        job = self._job(prepared, emit)
        job.group = prepared.request.group or prepared.request.request_id
        prepared.served.worker.submit(job)
        self._live.add(end)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            self._live.discard(end)
            job.cancelled = True

    def interrupt(self, err: GuardError) -> int:
        """End every running stream with ``err`` (an error event); return how many there were.

        Called on the event loop. Each generation is then cancelled like one whose client left,
        and a flagged one is written to the log with outcome ``interrupted`` (its record as far
        as it got).
        """
        self._interrupting = True
        live = list(self._live)
        for end in live:
            end(err)
        return len(live)

    def _job(
        self, prepared: PreparedGeneration, emit: Callable[[Event], None]
    ) -> GuardedGeneration:
        served = prepared.served
        req = prepared.request
        record = GenerationRecord(
            request_id=req.request_id,
            policy_name=served.policy.name,
            policy_hash=served.policy.content_hash,
            model=served.engine.info.name,
            messages=req.messages,
            prompt=req.prompt if isinstance(req.prompt, str) else None,
            prompt_tokens=len(prepared.prompt_ids),
        )
        trace = self.telemetry.generation(record)  # the request span starts now, on the event loop
        log_writes = GenerationLogging(
            served.policy.log.keeps, self._registry.writer(served), trace.watch(emit)
        )

        def on_finish(rec: GenerationRecord) -> str | None:
            if (
                self._interrupting and rec.outcome == "cancelled"
            ):  # cut off by a drain, not by its client
                rec.outcome = "interrupted"
            return log_writes.finish(rec)

        return GuardedGeneration(
            served.engine,
            prepared.prompt_ids,
            prepared.params,
            served.monitors,
            served.config,
            record,
            log_writes.emit,
            on_finish,
            trace,
            on_checkpoint=log_writes.checkpoint,
            retracting=req.client_retracts,
        )
