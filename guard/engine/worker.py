"""One thread that owns an engine and interleaves the steps of every active generation, fairly
across requests.

Concurrency contract: a generation never waits for another to finish, and a request never waits
for another request's fan-out. Jobs are grouped by :attr:`Job.group` (the client request they
belong to: its ``n`` choices and prompts); each pass of the loop gives every group one
:meth:`Job.advance` (one engine step plus the controller's decision), rotating through the group's
jobs. So a request with 128 generations and a request with one progress at the same rate, each at
about 1/G of the engine's step rate for G active requests, and a new request starts at the next
pass. At most ``max_active_per_group`` jobs of a group hold engine state at once; the rest wait
(in order) for one of them to leave. Engines are only ever called from this thread, so they need
no locks.

Waiting: an engine that generates ahead on its own (vLLM) may raise :class:`StepPending` from a
step whose token has not arrived yet, before changing anything, when it runs inside a worker
(:func:`waker` is not ``None``). The worker then gives the group's turn to its next job that can
move, and when a whole pass moved nothing it sleeps until the engine sets the worker's wake event
(something arrived) or a job is submitted. So one slow request (a prefill, a resubmission) never
holds up the tokens of the others, and the worker never spins.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import OrderedDict, deque
from typing import Protocol

log = logging.getLogger(__name__)

_anonymous = itertools.count()


class StepPending(Exception):
    """An engine step would wait for a token that has not arrived; nothing was changed (see the
    module docstring). Raised only where :func:`waker` returns an event."""


_local = threading.local()


def waker() -> threading.Event | None:
    """The wake event of the worker whose thread is calling: an engine that raises
    :class:`StepPending` sets it when what the step waits for arrives. ``None`` outside a worker
    (steps must then block until their token is there)."""
    return getattr(_local, "wake", None)


class Job(Protocol):
    """A unit of work the worker advances step by step.

    A job may have a ``group`` attribute (a string): jobs of one group share one turn per pass.
    Without one, a job is a group of its own."""

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


class _Group:
    """The jobs of one request: ``running`` take turns, ``waiting`` start when one leaves."""

    def __init__(self) -> None:
        self.running: deque[Job] = deque()
        self.waiting: deque[Job] = deque()


class EngineWorker:
    """Runs jobs for one engine on a daemon thread."""

    idle_wait_s = 1.0
    """Longest sleep while every job's step is pending (a safety net: every arrival wakes it)."""

    def __init__(self, name: str = "guard-engine", max_active_per_group: int = 16) -> None:
        if max_active_per_group < 1:
            raise ValueError(f"max_active_per_group must be >= 1, got {max_active_per_group}")
        self.max_active_per_group = max_active_per_group
        self._incoming: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        self._active = 0
        self._count_lock = threading.Lock()
        self._stopping = False
        self._wake = threading.Event()
        """Set when a job is submitted or an engine delivers what a pending step waits for."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        """Jobs submitted and not yet dropped (running or waiting for their group's turn)."""
        return self._active

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise RuntimeError("the engine worker is stopped")
        with self._count_lock:  # counted at once, so a caller sees its job as active immediately
            self._active += 1
        self._incoming.put(job)
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._incoming.put(None)
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        _local.wake = self._wake
        while not self._stopping:
            self._wake.clear()
            self._take_new(block=not self._groups)
            if not self._pass() and self._groups:
                # Every job waits for its engine: sleep until something arrives. The timeout is a
                # safety net only (every arrival sets the event).
                self._wake.wait(self.idle_wait_s)
        for group in list(self._groups.values()):
            for job in [*group.running, *group.waiting]:
                job.cancelled = True
                self._drop(job)
        self._groups.clear()

    def _take_new(self, block: bool) -> None:
        try:
            item = self._incoming.get(block=block)
            while True:
                if item is not None:
                    self._add(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            pass

    def _add(self, job: Job) -> None:
        key = getattr(job, "group", None) or f"job-{next(_anonymous)}"
        group = self._groups.setdefault(key, _Group())
        (group.running if len(group.running) < self.max_active_per_group else group.waiting).append(
            job
        )

    def _pass(self) -> bool:
        """One step for each group: its next running job that can move (cancelled jobs anywhere are
        dropped). Returns whether any job moved."""
        moved = False
        for key, group in list(self._groups.items()):
            for job in [j for j in (*group.running, *group.waiting) if j.cancelled]:
                (group.running if job in group.running else group.waiting).remove(job)
                self._drop(job)
                moved = True
            for _ in range(len(group.running)):
                job = group.running[0]
                group.running.rotate(-1)
                done = self._advance(job)
                if done is None:  # pending: the group's turn goes to its next job
                    continue
                moved = True
                if done:
                    group.running.remove(job)
                    self._drop(job)
                break
            while group.waiting and len(group.running) < self.max_active_per_group:
                group.running.append(group.waiting.popleft())
            if not group.running:
                del self._groups[key]
        return moved

    @staticmethod
    def _advance(job: Job) -> bool | None:
        """True: the job finished; False: it moved; None: its step is pending."""
        try:
            return job.advance()
        except StepPending:
            return None
        except BaseException as exc:
            log.exception("generation failed")
            job.fail(exc)
            return True

    def _drop(self, job: Job) -> None:
        with self._count_lock:
            self._active -= 1
        try:
            job.close()
        except Exception:
            log.exception("closing a job failed")
