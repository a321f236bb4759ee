"""Hostile policy files: alias bombs, NUL and invalid bytes, oversized files, files that are not
regular, and artefact paths that point where they must not. Each is a ``file:line:col`` error in
``policy check`` and in a served reload alike, fast; and a reload in progress cannot hold up
shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from guard.errors import PolicyError
from guard.policy import load_policy
from guard.policy.loader import MAX_POLICY_BYTES
from guard.policy.paths import MAX_SPEC_BYTES, ROOTS_ENV
from guard.service import ServedModel

HEAD = "name: a\nmodel: {engine: vllm, path: some-model}\n"
REPO = Path(__file__).resolve().parent.parent


def alias_bomb(levels: int = 10) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return HEAD + "\n".join(lines) + "\n"


def errors_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value.errors


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    t0 = time.perf_counter()
    (err,) = errors_of(path)
    assert time.perf_counter() - t0 < 5.0  # no expansion at all: the first alias is the error
    assert err.startswith(f"{path}:4:10: ") and "aliases (*a0) are not allowed" in err


def test_a_single_alias_is_refused_where_it_is(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text(HEAD + "description: &d hello\nmonitors: *d\n")
    (err,) = errors_of(path)
    assert err.startswith(f"{path}:4:11: ") and "*d" in err


@pytest.mark.parametrize(
    "raw,where,what",
    [
        (b"name: a\nmo\x00del: x\n", "2:3", "U+0000"),
        (b"name: a\ndescription: caf\xe9\n", "2:17", "invalid UTF-8 byte 0xe9"),
        (b"name: a\ndescription: \x1b[31m\n", "2:14", "U+001B"),
    ],
)
def test_nul_and_invalid_bytes_are_file_line_col_errors(tmp_path, raw, where, what):
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw)
    (err,) = errors_of(path)
    assert err.startswith(f"{path}:{where}: ") and what in err


def test_an_oversized_policy_file_is_refused_without_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(HEAD + "description: '" + "x" * MAX_POLICY_BYTES + "'\n")
    (err,) = errors_of(path)
    assert f"at most {MAX_POLICY_BYTES}" in err


def test_a_policy_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    (err,) = errors_of(fifo)  # a FIFO would block a reader forever
    assert "regular file" in err


def spec_policy(tmp_path: Path, spec_file: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + f"deliberation: {{mode: always, spec_file: {spec_file}}}\n")
    return path


@pytest.mark.parametrize(
    "spec_file,message",
    [
        ("/etc/passwd", "under the system directory /etc"),
        ("/dev/zero", "under the system directory /dev"),
        ("/proc/self/environ", "under the system directory /proc"),
    ],
)
def test_spec_files_may_not_point_at_system_files(tmp_path, spec_file, message):
    (err,) = errors_of(spec_policy(tmp_path, spec_file))
    assert (
        err.startswith(f"{tmp_path / 'p.yaml'}:3:")
        and "deliberation.spec_file" in err
        and message in err
    )


def test_spec_files_must_be_small_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.md")
    (err,) = errors_of(spec_policy(tmp_path, "fifo.md"))
    assert "not a regular file" in err
    (tmp_path / "big.md").write_text("x" * (MAX_SPEC_BYTES + 1))
    (err,) = errors_of(spec_policy(tmp_path, "big.md"))
    assert f"at most {MAX_SPEC_BYTES}" in err


def test_artifact_roots_confine_spec_probe_and_sae_paths(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "spec.md").write_text("rules")
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "spec.md").write_text("rules")
    monkeypatch.setenv(ROOTS_ENV, str(tmp_path / "models"))
    (err,) = errors_of(spec_policy(policy_dir, str(outside / "spec.md")))
    assert "outside the allowed roots" in err
    assert (
        load_policy(spec_policy(policy_dir, "spec.md"), check_paths=False).deliberation.spec_text()
        == "rules"
    )
    monkeypatch.delenv(ROOTS_ENV)
    assert (
        load_policy(spec_policy(policy_dir, str(outside / "spec.md"))).deliberation.spec_text()
        == "rules"
    )


def test_policy_check_reports_the_same_errors(tmp_path):
    path = spec_policy(tmp_path, "/etc/passwd")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    run = subprocess.run(
        [sys.executable, "-m", "guard.cli", "policy", "check", str(path), str(bomb)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode != 0
    assert "under the system directory /etc" in run.stdout + run.stderr
    assert "aliases (*a0) are not allowed" in run.stdout + run.stderr


def test_a_served_reload_of_a_bomb_is_an_error_and_the_last_good_policy_serves(
    tiny_model_dir, tmp_path
):
    from guard.service import GuardService

    path = tmp_path / "p.yaml"
    good = f"name: p\nmodel: {{path: {tiny_model_dir}}}\nlog: {{path: {tmp_path / 'g.db'}}}\n"
    path.write_text(good)
    service = GuardService.from_policy_files([path])
    try:
        served = service.resolve("p")
        path.write_text(good + "x: &x [1]\ny: *x\n")
        t0 = time.perf_counter()
        assert service.reload_changed() == []
        assert time.perf_counter() - t0 < 5.0
        assert "aliases (*x) are not allowed" in service.health()["models"][0]["reload_error"]
        path.write_text(good + "deliberation: {mode: always, spec_file: /etc/passwd}\n")
        assert service.reload_changed() == []
        assert "system directory /etc" in service.health()["models"][0]["reload_error"]
        assert service.resolve("p") is served
    finally:
        service.close()


class StuckReload:
    """A reloadable service whose reload never ends by itself (like one loading a huge model)."""

    def __init__(self) -> None:
        self.reloading, self.release = threading.Event(), threading.Event()

    def list_models(self):
        return [ServedModel(id="m", created=0)]

    def key_bindings(self):
        return {}

    def health(self):
        return {"status": "ok"}

    def reload_changed(self):
        self.reloading.set()
        self.release.wait(600)
        return []


def test_a_reload_in_progress_does_not_hold_up_shutdown():
    from server.app import RELOAD_SHUTDOWN_WAIT_S, ServerSettings, create_app

    stuck = StuckReload()
    app = create_app(ServerSettings(reload_interval_s=0.01), service_factory=lambda: stuck)
    try:
        with TestClient(app) as client:
            assert client.get("/health").status_code == 200
            assert stuck.reloading.wait(60)
            t0 = time.perf_counter()
        assert time.perf_counter() - t0 < RELOAD_SHUTDOWN_WAIT_S + 5.0
    finally:
        stuck.release.set()
