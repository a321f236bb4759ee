"""Flagged generations are durable while they run: a checkpoint (outcome ``interrupted``) is
written when a generation is first flagged and completed under the same id at the end; a client
that leaves is recorded as ``cancelled``; kill -9 leaves the checkpoint; and the engine never waits
on the log database (writes go through a writer thread, the final event waits on the write)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
import torch
from test_logstore import make_record

from guard.controller.events import Finished, TextDelta
from guard.logstore import LogStore
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.service import GenerationRequest, GuardService

HI = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "guard.db")
    return request.getfixturevalue("pg_url")()


def test_a_checkpoint_is_replaced_by_the_final_record_and_keeps_its_labels(target):
    with LogStore(target) as store:
        final = make_record(spans=2)
        checkpoint = final.checkpoint([5], "Here")
        log_id = store.write(checkpoint)
        got = store.get(log_id)
        assert (got.outcome, got.complete, got.finish_reason, got.final_text) == (
            "interrupted",
            False,
            None,
            "Here",
        )
        store.label(log_id, "unsure", reviewer="ann")
        assert store.write(final, log_id) == log_id
        assert store.get(log_id) == final and store.count() == 1
        assert store.list(monitor="harm-probe")[0].label == "unsure"


def always_firing_probe(directory: Path, d_model: int) -> Path:
    """A probe whose threshold 0 every sigmoid score exceeds: it fires on the first scored token."""
    g = torch.Generator().manual_seed(0)
    ProbeMonitor(
        "p",
        1,
        torch.randn(d_model, generator=g),
        0.0,
        threshold=0.0,
        aggregation=AggregationSpec("none"),
    ).save(directory)
    return directory


def policies(tmp_path: Path, model_dir: Path, d_model: int) -> list[Path]:
    """``flagged``: a shadow probe that fires at once (every generation is flagged, none changed);
    ``plain``: no monitors, same model (so the same engine and worker)."""
    probe = always_firing_probe(tmp_path / "probe", d_model)
    flagged, plain = tmp_path / "flagged.yaml", tmp_path / "plain.yaml"
    flagged.write_text(
        f"name: flagged\nmodel: {{path: {model_dir}}}\nlog: {{path: {tmp_path / 'g.db'}}}\n"
        f"monitors:\n  - {{name: harm, kind: probe, path: {probe}, action: shadow}}\n"
    )
    plain.write_text(
        f"name: plain\nmodel: {{path: {model_dir}}}\nlog: {{path: {tmp_path / 'g.db'}}}\n"
    )
    return [flagged, plain]


class GatedStore:
    """Wraps a LogStore: each write waits for ``gate`` (when set up closed); notes checkpoints written."""

    def __init__(self, store: LogStore, gate: threading.Event) -> None:
        self.store, self.gate, self.where = store, gate, store.where
        self.checkpointed = threading.Event()

    def write(self, record, log_id=None):
        assert self.gate.wait(60), "the test never opened the gate"
        out = self.store.write(record, log_id)
        if not record.complete:
            self.checkpointed.set()
        return out


def gate_writes(service: GuardService, open_: bool) -> GatedStore:
    served = service.resolve("flagged")
    writer = service._writers[id(served.store)]
    writer.store = gated = GatedStore(served.store, threading.Event())
    if open_:
        gated.gate.set()
    return gated


def request(model: str, rid: str, max_tokens: int, eos_ban: list[int]) -> GenerationRequest:
    return GenerationRequest(
        model=model,
        request_id=rid,
        messages=HI,
        max_tokens=max_tokens,
        seed=1,
        banned_token_ids=frozenset(eos_ban),
    )


def test_the_engine_never_waits_on_the_log_and_the_final_event_waits_on_the_write(
    tiny_model_dir, tiny_engine, tmp_path
):
    service = GuardService.from_policy_files(
        policies(tmp_path, tiny_model_dir, tiny_engine.info.d_model)
    )
    try:
        gated = gate_writes(service, open_=False)
        eos = list(tiny_engine.info.eos_token_ids)

        async def scenario() -> None:
            flagged_events: list = []

            async def run_flagged() -> None:
                async for event in service.stream(
                    service.prepare(request("flagged", "f", 40, eos))
                ):
                    flagged_events.append(event)

            flagged = asyncio.create_task(run_flagged())
            # While every log write is blocked, an unflagged generation on the same engine runs to the end.
            plain = [
                e async for e in service.stream(service.prepare(request("plain", "p", 40, eos)))
            ]
            assert isinstance(plain[-1], Finished) and plain[-1].log_id is None
            assert not any(isinstance(e, Finished) for e in flagged_events), (
                "final event before the write"
            )
            gated.gate.set()
            await asyncio.wait_for(flagged, 120)
            fin = flagged_events[-1]
            assert isinstance(fin, Finished) and fin.log_id is not None
            record = service.resolve("flagged").store.get(
                fin.log_id
            )  # durable when the event arrived
            assert record.complete and record.outcome == "clean" and record.firings
            assert record.final_text == fin.text

        asyncio.run(scenario())
    finally:
        service.close()


def test_a_running_flagged_generation_is_checkpointed_and_a_dropped_client_is_cancelled(
    tiny_model_dir, tiny_engine, tmp_path
):
    service = GuardService.from_policy_files(
        policies(tmp_path, tiny_model_dir, tiny_engine.info.d_model)
    )
    try:
        gated = gate_writes(service, open_=True)
        eos = list(tiny_engine.info.eos_token_ids)

        async def scenario() -> str:
            stream = service.stream(service.prepare(request("flagged", "c", 400, eos)))
            async with aclosing(stream):
                async for event in stream:
                    if isinstance(event, TextDelta) and await asyncio.to_thread(
                        gated.checkpointed.wait, 60
                    ):
                        with LogStore(
                            tmp_path / "g.db"
                        ) as reader:  # still running: the client is here
                            (summary,) = reader.list()
                            running = reader.get(summary.id)
                        break  # the client leaves mid-answer
            assert (running.outcome, running.complete, running.finish_reason) == (
                "interrupted",
                False,
                None,
            )
            assert running.firings and running.firings[0].monitor == "harm"
            return summary.id

        log_id = asyncio.run(scenario())
    finally:
        service.close()  # writes what is queued
    with LogStore(tmp_path / "g.db") as reader:
        record = reader.get(log_id)
        assert (record.outcome, record.finish_reason, record.complete) == ("cancelled", None, True)
        assert record.output_ids and record.sampled_tokens >= len(record.output_ids)


def test_kill_9_leaves_the_checkpoint_of_a_running_flagged_stream(
    tiny_model_dir, tiny_engine, tmp_path
):
    from guard.testing import serve_in_subprocess

    flagged, _ = policies(tmp_path, tiny_model_dir, tiny_engine.info.d_model)
    proc, url = serve_in_subprocess([flagged], tmp_path / "server.log", "--reload-interval", "0")
    try:
        body = {
            "model": "flagged",
            "messages": HI,
            "max_tokens": 480,
            "stream": True,
            "banned_token_ids": list(tiny_engine.info.eos_token_ids),
        }
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while '"content"' not in next(lines):
                pass
            with LogStore(tmp_path / "g.db") as reader:
                deadline = time.monotonic() + 60
                while (
                    not reader.list() and time.monotonic() < deadline
                ):  # the writer thread's commit
                    time.sleep(0.05)
                assert reader.list(), "no checkpoint while the stream runs"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with LogStore(tmp_path / "g.db") as reader:
        (summary,) = reader.list()
        record = reader.get(summary.id)
        assert (record.outcome, record.complete) == ("interrupted", False) and record.firings
    with sqlite3.connect(tmp_path / "g.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_cut_waits_for_the_write_that_records_its_firing(tmp_path):
    """A plain client's stream that ends in a Cut shows the refusal only once the log holds the firing
    behind it (as for a Reset), so a kill right after cannot lose what the client was shown."""
    from guard.controller.events import Cut
    from guard.logstore.writer import GenerationLogging, LogWriter

    with LogStore(tmp_path / "cut.db") as store:
        gated = GatedStore(store, threading.Event())
        writer = LogWriter(gated)
        got, cut_arrived = [], threading.Event()

        def emit(event):
            got.append(event)
            if isinstance(event, Cut):
                cut_arrived.set()

        logging_ = GenerationLogging(lambda flagged: flagged, writer, emit)
        logging_.emit(TextDelta("Sure.", (5,)))
        logging_.emit(Cut(refusal="No.", kept_chars=5, monitor="harm-probe"))
        logging_.checkpoint(make_record(outcome="refused").checkpoint([5], "Sure."))
        assert [type(e) for e in got] == [TextDelta], "the cut went out before its write"
        gated.gate.set()
        assert cut_arrived.wait(60)
        assert gated.checkpointed.is_set() and store.get(logging_.log_id).outcome == "interrupted"
        writer.close()
