"""Hot reload of policy files: valid edits swap in (in-flight generations keep the old policy),
invalid edits keep the last good policy and are reported, engines are reused or loaded first."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from guard.controller.events import Finished
from guard.logstore import LogStore
from guard.service import GenerationRequest, GuardService
from server.app import ServerSettings, create_app

HI = [{"role": "user", "content": "Hello there"}]


def policy_text(
    model_dir: Path, log: Path, name: str = "p", holdback: int = 8, refusal: str = "No."
) -> str:
    return (
        f"name: {name}\nmodel: {{path: {model_dir}}}\nstream: {{holdback_tokens: {holdback}}}\n"
        f"backtrack: {{refusal: {refusal!r}}}\nlog: {{path: {log}, record: all}}\n"
    )


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(policy_text(tiny_model_dir, tmp_path / "guard.db"))
    service = GuardService.from_policy_files([path])
    yield service, path, tmp_path
    service.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def generate(service: GuardService, prepared) -> Finished:
    events = [e async for e in service.stream(prepared)]
    return events[-1]


def prepare(service: GuardService, rid: str):
    return service.prepare(
        GenerationRequest(model="p", request_id=rid, messages=HI, max_tokens=4, seed=0)
    )


def test_valid_edit_swaps_in_and_reuses_the_engine(setup, tiny_model_dir):
    service, path, tmp = setup
    old = service.resolve("p")
    assert service.reload_changed() == [], "nothing changed"
    path.write_text(policy_text(tiny_model_dir, tmp / "guard.db", holdback=3, refusal="Nope."))
    assert service.reload_changed() == ["p"]
    new = service.resolve("p")
    assert new is not old and new.engine is old.engine and new.worker is old.worker
    assert (new.config.holdback_tokens, new.config.refusal) == (3, "Nope.")
    model = service.health()["models"][0]
    assert (
        model["policy_hash"] == sha(path)
        and model["reloads"] == 1
        and model["reload_error"] is None
    )
    assert service.list_models()[0].created == old.created


def test_in_flight_generations_keep_the_old_policy_and_new_records_carry_the_new_hash(
    setup, tiny_model_dir
):
    service, path, tmp = setup
    old_hash = sha(path)
    before = prepare(service, "before")
    path.write_text(policy_text(tiny_model_dir, tmp / "guard.db", holdback=2))
    assert service.reload_changed() == ["p"]
    after = prepare(service, "after")

    async def both():
        return await asyncio.gather(generate(service, before), generate(service, after))

    results = asyncio.run(both())
    with LogStore(tmp / "guard.db") as store:
        hashes = {store.get(f.log_id).request_id: store.get(f.log_id).policy_hash for f in results}
    assert hashes == {"before": old_hash, "after": sha(path)} and old_hash != sha(path)


def test_invalid_edit_keeps_the_last_good_policy_and_reports_it(setup, tiny_model_dir, caplog):
    service, path, tmp = setup
    good = sha(path)
    path.write_text(
        policy_text(tiny_model_dir, tmp / "guard.db")
        + "stream: {holdback_tokens: -1}\n"
        + "monitors:\n  - {name: x, kind: probe, path: nowhere, scope: input}\n"
    )
    assert service.reload_changed() == []
    model = service.health()["models"][0]
    assert model["policy_hash"] == good and model["reloads"] == 0
    error = model["reload_error"]
    assert f"{path}:6:1: stream: duplicate key 'stream'" in error
    assert f"{path}:" in caplog.text and "still serving the last good version" in caplog.text
    asyncio.run(generate(service, prepare(service, "still-serving")))
    assert (
        service.reload_changed() == [] and service.health()["models"][0]["reload_error"] == error
    ), "no retry"
    path.write_text(policy_text(tiny_model_dir, tmp / "guard.db", holdback=1))
    assert service.reload_changed() == ["p"]
    model = service.health()["models"][0]
    assert model["reload_error"] is None and model["policy_hash"] == sha(path)


def test_every_error_of_a_bad_edit_is_reported_with_its_position(setup, tiny_model_dir):
    service, path, tmp = setup
    path.write_text(
        policy_text(tiny_model_dir, tmp / "guard.db").replace(
            "holdback_tokens: 8", "holdback_tokens: x"
        )
        + "on_monitor_error: sometimes\n"
    )
    service.reload_changed()
    error = service.health()["models"][0]["reload_error"]
    assert f"{path}:3:27: stream.holdback_tokens:" in error
    assert f"{path}:6:19: on_monitor_error: invalid value 'sometimes'" in error


def test_deleted_file_keeps_serving(setup):
    service, path, _ = setup
    path.unlink()
    assert service.reload_changed() == []
    assert "cannot read policy file" in service.health()["models"][0]["reload_error"]
    assert service.resolve("p")


def test_changed_model_path_loads_a_new_engine_before_swapping(setup, tmp_path, monkeypatch):
    service, path, tmp = setup
    other = shutil.copytree(Path(service.resolve("p").policy.model.path), tmp_path / "other-model")
    old = service.resolve("p")
    path.write_text(policy_text(other, tmp / "guard.db"))
    assert service.reload_changed() == ["p"]
    new = service.resolve("p")
    assert new.engine is not old.engine and new.worker is not old.worker
    # The old engine is retired, then stopped once idle for the grace period.
    monkeypatch.setattr("guard.service.registry.RETIRE_GRACE_S", 0.0)
    service.reload_changed()
    assert not old.worker._thread.is_alive()
    asyncio.run(generate(service, prepare(service, "new-engine")))


def test_rename_to_a_served_name_is_rejected(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(policy_text(tiny_model_dir, tmp_path / "g.db", name="a"))
    b.write_text(policy_text(tiny_model_dir, tmp_path / "g.db", name="b"))
    service = GuardService.from_policy_files([a, b])
    try:
        b.write_text(policy_text(tiny_model_dir, tmp_path / "g.db", name="a"))
        assert service.reload_changed() == []
        assert (
            "policy name 'a' is already served from"
            in service.health()["models"][1]["reload_error"]
        )
        b.write_text(policy_text(tiny_model_dir, tmp_path / "g.db", name="c"))
        assert service.reload_changed() == ["c"]
        assert [m.id for m in service.list_models()] == ["a", "c"]
    finally:
        service.close()


def test_the_server_watches_its_policy_files(tiny_model_dir, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(policy_text(tiny_model_dir, tmp_path / "guard.db"))
    settings = ServerSettings(policy_paths=(str(path),), reload_interval_s=0.05)
    with TestClient(create_app(settings)) as http:

        def health_when(check) -> dict:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                model = http.get("/health/detail").json()["models"][0]
                if check(model):
                    return model
                time.sleep(0.05)
            raise AssertionError(f"/health never showed the change: {model}")

        path.write_text(policy_text(tiny_model_dir, tmp_path / "guard.db", holdback=0))
        health_when(lambda m: m["policy_hash"] == sha(path))
        r = http.post("/v1/chat/completions", json={"model": "p", "messages": HI, "max_tokens": 2})
        assert r.status_code == 200
        path.write_text("name: p\nmodel: {path: model}\nmonitors: [}\n")
        model = health_when(lambda m: m["reload_error"] is not None)
        assert f"{path}:3:" in model["reload_error"] and "YAML syntax" in model["reload_error"]
        r = http.post("/v1/chat/completions", json={"model": "p", "messages": HI, "max_tokens": 2})
        assert r.status_code == 200, "the last good policy keeps serving"
