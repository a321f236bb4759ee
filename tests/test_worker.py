"""The engine worker interleaves generations: a short request never waits for a long one, and one
request's fan-out never starves another request. Orderings are decided by events the jobs emit on
the worker's thread, never by sleeping, so the tests hold on a loaded machine
(``test_worker_tests_pass_under_a_cpu_hog`` runs them next to a spinning process)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from guard.controller.backtrack import GuardedGeneration
from guard.controller.events import Finished, TextDelta
from guard.engine.worker import EngineWorker
from guard.policy.build import default_controller_config
from guard.sampling import SamplingParams
from tests.conftest import generation_record

WAIT_S = 120  # only a bound on a hung test: every wait below ends on an event


def _job(engine, name, max_tokens, done, on_text=None):
    """A generation that appends ``(name, completion tokens)`` to ``done`` when it finishes and calls
    ``on_text()`` (on the worker's thread) at each released text."""
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Count to a hundred."}])
    rec = generation_record(request_id=name, prompt=None, prompt_tokens=len(prompt))
    params = SamplingParams(
        seed=1, max_tokens=max_tokens, banned_token_ids=engine.info.eos_token_ids
    )

    def emit(ev):
        if isinstance(ev, TextDelta) and on_text is not None:
            on_text()
        if isinstance(ev, Finished):
            done.append((name, ev.usage.completion_tokens))

    return GuardedGeneration(
        engine, prompt, params, [], default_controller_config(holdback_tokens=0), rec, emit
    )


def _closed(job) -> threading.Event:
    """An event set once the worker has dropped ``job`` (its ``close`` ran)."""
    event, close = threading.Event(), job.close

    def closing():
        close()
        event.set()

    job.close = closing
    return event


def test_short_request_finishes_while_a_long_one_runs(tiny_engine):
    worker = EngineWorker()
    done: list = []
    started = threading.Event()
    try:
        long_job = _job(tiny_engine, "long", 40, done, on_text=started.set)
        long_closed = _closed(long_job)
        worker.submit(long_job)
        assert started.wait(WAIT_S)  # the long generation is under way
        short = _job(tiny_engine, "short", 5, done)
        short_closed = _closed(short)
        worker.submit(short)
        assert short_closed.wait(WAIT_S) and long_closed.wait(WAIT_S)
        assert [d[0] for d in done] == ["short", "long"]
        assert dict(done) == {"short": 5, "long": 40}
    finally:
        worker.stop()


def test_cancelled_job_is_dropped_and_released(tiny_engine):
    worker = EngineWorker()
    done: list = []
    started, cancelled = threading.Event(), threading.Event()

    def pause_until_cancelled():  # on the worker's thread: it takes no further step until cancelled
        started.set()
        assert cancelled.wait(WAIT_S)

    try:
        job = _job(tiny_engine, "cancel-me", 10_000 // 50, done, on_text=pause_until_cancelled)
        closed = _closed(job)
        worker.submit(job)
        assert started.wait(WAIT_S)
        job.cancelled = True
        cancelled.set()
        assert closed.wait(WAIT_S)
        assert worker.active == 0 and not done
        assert job.seq.payload.cache is None  # the KV cache was freed
    finally:
        worker.stop()
    assert not threading.Thread.is_alive(worker._thread)


def test_one_requests_fan_out_does_not_starve_another(tiny_engine):
    """16 generations of one request against one of another: the single one gets every other step
    (its group's turn), so it finishes while each fan-out generation is far from done."""
    worker = EngineWorker()
    done: list = []
    started = threading.Event()
    try:
        fan_out = []
        for i in range(16):
            job = _job(tiny_engine, f"fan-{i}", 12, done, on_text=started.set)
            job.group = "request-a"
            fan_out.append(job)
        fan_closed = [_closed(j) for j in fan_out]
        for job in fan_out:
            worker.submit(job)
        assert started.wait(WAIT_S)
        single = _job(tiny_engine, "single", 8, done)
        single.group = "request-b"
        single_closed = _closed(single)
        worker.submit(single)
        assert single_closed.wait(WAIT_S)
        progress = [j.record.sampled_tokens for j in fan_out]
        # Round robin over 2 groups: while "single" sampled 8 tokens the 16 fan-out jobs shared about
        # 8 steps, not 8 each as one turn per job would give them.
        assert sum(progress) <= 2 * 8 + 16, progress
        assert done[0][0] == "single"
        assert all(e.wait(WAIT_S) for e in fan_closed) and len(done) == 17
    finally:
        worker.stop()


def test_a_group_runs_at_most_its_share_of_jobs_at_once(tiny_engine):
    worker = EngineWorker(max_active_per_group=2)
    done: list = []
    try:
        jobs = [_job(tiny_engine, f"g-{i}", 8, done) for i in range(5)]
        for job in jobs:
            job.group = "one-request"
        closed = [_closed(j) for j in jobs]
        for job in jobs:
            worker.submit(job)
        assert all(e.wait(WAIT_S) for e in closed)
        # Two at a time, in submission order: g-0 and g-1 finish before g-2..g-4 have started.
        assert [d[0] for d in done][:2] == ["g-0", "g-1"] and sorted(dict(done).values()) == [8] * 5
    finally:
        worker.stop()


def test_worker_tests_pass_under_a_cpu_hog():
    """Run this file's other tests while another process spins on a CPU: they must still pass."""
    if os.environ.get("GUARD_UNDER_CPU_HOG"):
        return  # the inner run
    hog_code = "while True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", hog_code])]
    try:
        env = {**os.environ, "GUARD_UNDER_CPU_HOG": "1"}
        root = Path(__file__).resolve().parent.parent
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                str(Path(__file__)),
                "-k",
                "not cpu_hog",
            ],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


class _Pending:
    """A job whose step is pending (:class:`StepPending`) until ``arrived`` is set, as a vLLM step is
    until its token arrives; it then sets the worker's wake event the way an engine does."""

    cancelled = False

    def __init__(self, group: str, steps: int) -> None:
        self.group, self.steps = group, steps
        self.arrived = threading.Event()
        self.tries = 0
        self.wake = None
        self.closed = threading.Event()

    def advance(self) -> bool:
        from guard.engine.worker import StepPending, waker

        self.wake = waker()
        self.tries += 1
        if not self.arrived.is_set():
            raise StepPending()
        self.steps -= 1
        return self.steps == 0

    def deliver(self) -> None:
        self.arrived.set()
        self.wake.set()

    def fail(self, exc: BaseException) -> None:
        raise AssertionError(f"a pending step is not a failure: {exc!r}")

    def close(self) -> None:
        self.closed.set()


def test_a_pending_step_holds_up_no_other_job_and_resumes_on_wake():
    worker = EngineWorker()
    worker.idle_wait_s = 10 * WAIT_S  # so only the wake event can end its sleep in time
    try:
        waiting = _Pending("a", steps=2)
        sibling = _Pending(
            "a", steps=3
        )  # same group: takes the group's turns while its sibling waits
        other = _Pending("b", steps=3)
        sibling.arrived.set()
        other.arrived.set()
        for job in (waiting, sibling, other):
            worker.submit(job)
        assert sibling.closed.wait(WAIT_S) and other.closed.wait(WAIT_S)
        assert not waiting.closed.is_set() and worker.active == 1
        assert (
            waiting.tries < 100
        )  # it sleeps between tries (a spinning worker tries thousands of times)
        waiting.deliver()  # the worker is asleep: the wake event brings it back
        assert waiting.closed.wait(WAIT_S) and worker.active == 0
    finally:
        worker.stop()
