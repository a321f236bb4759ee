"""One thread that owns an engine and interleaves the steps of every active generation.

Concurrency contract: a generation never waits for another to finish. Each pass of the loop
gives every active job one :meth:`Job.advance` (one engine step plus the controller's decision),
so N concurrent streams each progress at about 1/N of the single-stream rate, and a new request
starts at the next pass. Engines are only ever called from this thread, so they need no locks.
(A batched engine can later replace the per-job step inside :meth:`EngineWorker._pass` without
changing jobs.)
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Job(Protocol):
    """A unit of work the worker advances step by step."""

    cancelled: bool

    def advance(self) -> bool:
        """Do one step; return True when the job is finished (it is then dropped)."""
        ...

    def fail(self, exc: BaseException) -> None:
        """Called once if :meth:`advance` raised; the job is then dropped."""
        ...

    def close(self) -> None:
        """Free resources (called once when the job leaves the worker, for whatever reason)."""
        ...


class EngineWorker:
    """Runs jobs for one engine on a daemon thread."""

    def __init__(self, name: str = "guard-engine") -> None:
        self._incoming: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._active: list[Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise RuntimeError("the engine worker is stopped")
        self._incoming.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._incoming.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping:
            self._take_new(block=not self._active)
            self._pass()
        for job in list(self._active):  # a copy: _drop removes from the list
            job.cancelled = True
            self._drop(job)

    def _take_new(self, block: bool) -> None:
        try:
            item = self._incoming.get(block=block)
            while True:
                if item is not None:
                    self._active.append(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            pass

    def _pass(self) -> None:
        for job in list(self._active):
            if job.cancelled:
                self._drop(job)
                continue
            try:
                done = job.advance()
            except BaseException as exc:  # noqa: BLE001 - a job's failure must not kill the worker
                log.exception("generation failed")
                job.fail(exc)
                done = True
            if done:
                self._drop(job)

    def _drop(self, job: Job) -> None:
        self._active.remove(job)
        try:
            job.close()
        except Exception:  # noqa: BLE001
            log.exception("closing a job failed")
