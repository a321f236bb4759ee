"""The engine worker interleaves generations: a short request never waits for a long one."""

from __future__ import annotations

import threading
import time

from guard.controller.backtrack import ControllerConfig, GuardedGeneration
from guard.controller.events import Finished
from guard.controller.record import GenerationRecord
from guard.engine.worker import EngineWorker
from guard.sampling import SamplingParams


def _job(engine, name, max_tokens, done):
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Count to a hundred."}])
    rec = GenerationRecord(request_id=name, policy_name="p", policy_hash="h", model="m", messages=None,
                           prompt=None, prompt_tokens=len(prompt))
    params = SamplingParams(seed=1, max_tokens=max_tokens, banned_token_ids=engine.info.eos_token_ids)

    def emit(ev):
        if isinstance(ev, Finished):
            done.append((name, time.monotonic(), ev.usage.completion_tokens))

    return GuardedGeneration(engine, prompt, params, [], ControllerConfig(holdback_tokens=0), rec, emit)


def test_short_request_finishes_while_a_long_one_runs(tiny_engine):
    worker = EngineWorker()
    done: list = []
    try:
        long_job = _job(tiny_engine, "long", 300, done)
        worker.submit(long_job)
        time.sleep(0.2)  # the long generation is under way
        worker.submit(_job(tiny_engine, "short", 5, done))
        deadline = time.monotonic() + 120
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [d[0] for d in done] == ["short", "long"]
        assert dict((d[0], d[2]) for d in done) == {"short": 5, "long": 300}
    finally:
        worker.stop()


def test_cancelled_job_is_dropped_and_released(tiny_engine):
    worker = EngineWorker()
    done: list = []
    try:
        job = _job(tiny_engine, "cancel-me", 10_000 // 50, done)
        worker.submit(job)
        time.sleep(0.2)
        job.cancelled = True
        deadline = time.monotonic() + 10
        while worker.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.active == 0 and not done
        assert job.seq.payload.cache is None  # the KV cache was freed
    finally:
        worker.stop()
    assert not threading.Thread.is_alive(worker._thread)
