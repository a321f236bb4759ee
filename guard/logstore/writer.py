"""`LogWriter`: writes records to a :class:`~guard.logstore.LogStore` on a thread of its own.

The engine worker must never wait on the log database (a slow Postgres would stall every
generation on the engine), so the controller hands records to a writer and carries on. Contract:

- :meth:`LogWriter.submit` returns at once with a :class:`~concurrent.futures.Future` that
  resolves to the log id once the write is committed durably (or to the store's exception).
- Writes are applied in submission order (one thread per store), so a checkpoint submitted
  before a record's completion can never overwrite it.
- The caller snapshots the record before submitting (the controller keeps mutating its own).
- :meth:`LogWriter.close` writes everything still queued (up to ``timeout``), then stops.

:class:`GenerationLogging` is one generation's use of a writer: its checkpoints and final record
(one log id), and the events that wait for them. "Durable before the final event" holds: the final
event is released when the future of the completing write resolves, never by the engine thread
waiting.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from guard.controller.events import Cut, Event, Failed, Finished, Reset
from guard.controller.record import GenerationRecord
from guard.errors import EngineError
from guard.logstore.store import LogStore, new_log_id

log = logging.getLogger(__name__)


class LogWriter:
    """One daemon thread writing to ``store`` in order."""

    def __init__(self, store: LogStore, name: str = "guard-log-writer") -> None:
        self.store = store
        self._queue: queue.SimpleQueue[tuple[GenerationRecord, str, Future] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, record: GenerationRecord, log_id: str) -> Future:
        """Queue ``record`` (already a snapshot) to be stored under ``log_id``; never blocks."""
        done: Future = Future()
        if self._closed:
            done.set_exception(RuntimeError("the log writer is closed"))
            return done
        self._queue.put((record, log_id, done))
        return done

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            record, log_id, done = item
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(self.store.write(record, log_id))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                log.error(
                    "log write of %s (%s) to %s failed: %s",
                    log_id,
                    record.outcome,
                    self.store.where,
                    exc,
                )
                done.set_exception(exc)


class GenerationLogging:
    """One generation's log writes, through the store's :class:`LogWriter`, and the events that
    must wait for them.

    A checkpoint is written whenever the running generation is newly flagged (outcome
    ``interrupted`` until completed); the final record replaces it under the same id. Two kinds of
    event are held back until a write is durable, so that whatever a client has seen is in the
    log even if the process is then killed: a :class:`Reset` or :class:`Cut` (until the checkpoint
    that records its span or firing) and :class:`Finished` (until the final record; a failed final write turns it into
    :class:`Failed`). Events after a held one wait with it, so order is kept. The engine never
    waits: the writer thread releases held events when their write completes.
    """

    def __init__(
        self, keeps: Callable[[bool], bool], writer: LogWriter, emit: Callable[[Event], None]
    ) -> None:
        """``keeps(flagged)``: whether the policy logs such a generation; ``emit``: where events go."""
        self.keeps, self.writer, self._emit = keeps, writer, emit
        self.log_id: str | None = None
        self.final: Future | None = None
        self._lock = threading.Lock()
        self._held: collections.deque[Event] = collections.deque()
        self._added = self._sent = 0
        """Events ever held, and released, so far."""

    def checkpoint(self, rec: GenerationRecord) -> None:
        if self.keeps(True):
            self.log_id = self.log_id or new_log_id()
            self._release_after(self.writer.submit(rec, self.log_id))

    def finish(self, rec: GenerationRecord) -> str | None:
        if not self.keeps(rec.flagged):
            return None
        self.log_id = self.log_id or new_log_id()
        self.final = self.writer.submit(rec.snapshot(), self.log_id)
        return self.log_id

    def emit(self, event: Event) -> None:
        with self._lock:
            if isinstance(
                event, Failed
            ):  # nothing more will be written: send all that waits, then this
                self._release(self._added, None)
                self._emit(event)
                return
            hold = (
                bool(self._held)
                or (isinstance(event, (Reset, Cut)) and self.keeps(True))
                or (isinstance(event, Finished) and self.final is not None)
            )
            if not hold:
                self._emit(event)
                return
            self._held.append(event)
            self._added += 1
        if isinstance(event, Finished):
            if self.final is None:  # no write to wait for: send what waits now rather than never
                with self._lock:
                    self._release(self._added, None)
            else:
                self._release_after(self.final)

    def _release_after(self, write: Future) -> None:
        with self._lock:
            upto = self._added
        if upto > self._sent:
            write.add_done_callback(lambda done: self._released(upto, done))

    def _released(self, upto: int, done: Future) -> None:
        with self._lock:
            self._release(upto, done.exception())

    def _release(self, upto: int, error: BaseException | None) -> None:
        while self._sent < upto and self._held:
            event = self._held.popleft()
            self._sent += 1
            if isinstance(event, Finished) and error is not None:
                event = Failed(EngineError(f"the log write failed: {error}"))
            self._emit(event)
