"""`LogWriter`: writes records to a :class:`~guard.logstore.LogStore` on a thread of its own.

The engine worker must never wait on the log database (a slow Postgres would stall every
generation on the engine), so the controller hands records to a writer and carries on. Contract:

- :meth:`LogWriter.submit` returns at once with a :class:`~concurrent.futures.Future` that
  resolves to the log id once the write is committed durably (or to the store's exception).
- Writes are applied in submission order (one thread per store), so a checkpoint submitted
  before a record's completion can never overwrite it.
- The caller snapshots the record before submitting (the controller keeps mutating its own).
- :meth:`LogWriter.close` writes everything still queued (up to ``timeout``), then stops.

"Durable before the final event" is kept by the caller: the final event is sent when the
future of the completing write resolves, on the event loop, not on the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from guard.controller.record import GenerationRecord
from guard.logstore.store import LogStore

log = logging.getLogger(__name__)


class LogWriter:
    """One daemon thread writing to ``store`` in order."""

    def __init__(self, store: LogStore, name: str = "guard-log-writer") -> None:
        self.store = store
        self._queue: queue.SimpleQueue[tuple[GenerationRecord, str, Future] | None] = queue.SimpleQueue()
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
                log.error("log write of %s (%s) to %s failed: %s", log_id, record.outcome, self.store.where, exc)
                done.set_exception(exc)
