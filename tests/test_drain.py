"""Graceful drain (server/drain.py) with real `guard serve` processes, real signals, concurrent streams.

The policy serves the committed organism with a shadow probe at threshold 0: it fires on every
token and changes nothing, so every generation is flagged (logged) from its first token on. The
end-of-sequence token is banned, so a stream runs to ``max_tokens``.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from guard.logstore import LogStore
from guard.testing import serve_in_subprocess

REPO = Path(__file__).resolve().parent.parent
ORGANISM = REPO / "models" / "organism"
EOS = 1  # models/organism/config.json

pytestmark = pytest.mark.skipif(
    not (ORGANISM / "probe" / "probe.json").is_file(),
    reason="models/organism (with its probe) is not built",
)


def flag_everything_policy(dir: Path, log: str | None = None) -> Path:
    """The organism with a shadow probe that fires on every token (every generation is flagged)."""
    policy = {
        "name": "demo",
        "model": {"path": str(ORGANISM)},
        "monitors": [
            {
                "name": "harm-probe",
                "kind": "probe",
                "path": str(ORGANISM / "probe"),
                "threshold": 0.0,
                "action": "shadow",
            }
        ],
        "stream": {"holdback_tokens": 0},
        "log": {"path": log or str(dir / "guard.db"), "record": "flagged"},
    }
    path = dir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def chat_body(i: int, max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": f"Tell me a long story number {i}."}],
        "max_tokens": max_tokens,
        "seed": i,
        "stream": stream,
        "logit_bias": {str(EOS): -100},
    }


class Stream(threading.Thread):
    """A streaming chat request read as raw SSE; ``started`` is set at the first content delta."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.started = threading.Event()
        self.events: list[dict | str] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/chat/completions", json=self.body, timeout=120
            ) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    event = data if data == "[DONE]" else json.loads(data)
                    self.events.append(event)
                    if isinstance(event, dict) and any(
                        (c.get("delta") or {}).get("content") for c in event.get("choices", [])
                    ):
                        self.started.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.started.set()

    @property
    def text(self) -> str:
        return "".join(
            (c.get("delta") or {}).get("content") or ""
            for e in self.events
            if isinstance(e, dict)
            for c in e.get("choices", [])
        )

    @property
    def finish_reason(self) -> str | None:
        return next(
            (
                c["finish_reason"]
                for e in self.events
                if isinstance(e, dict)
                for c in e.get("choices", [])
                if c.get("finish_reason")
            ),
            None,
        )


def start_streams(url: str, n: int, max_tokens: int) -> list[Stream]:
    streams = [Stream(url, chat_body(i, max_tokens)) for i in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(120), "a stream sent no content"
        assert s.error is None and s.status == 200, (s.status, s.error)
    return streams


def wait_ready_status(url: str, status: int) -> httpx.Response:
    """Poll /ready until it answers ``status`` (the signal is handled asynchronously)."""
    for _ in range(600):
        r = httpx.get(f"{url}/ready", timeout=10)
        if r.status_code == status:
            return r
        threading.Event().wait(0.05)
    raise AssertionError(f"/ready never answered {status}; last {r.status_code} {r.text}")


def held_request(url: str, body: dict) -> tuple[socket.socket, bytes]:
    """Send a request's headers and all but the last byte of its body: it is in flight until the rest."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=120)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload[:-1]
    )
    return sock, payload[-1:]


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_sigterm_refuses_new_requests_and_lets_inflight_streams_finish(tmp_path):
    policy = flag_everything_policy(tmp_path)
    proc, url = serve_in_subprocess([policy], tmp_path / "server.log", "--drain-grace", "120")
    try:
        assert httpx.get(f"{url}/ready").json()["status"] == "ready"
        sock, last_byte = held_request(url, chat_body(99, 16, stream=False))
        for _ in range(600):  # wait until the server counts the held request in flight
            if httpx.get(f"{url}/ready").json()["inflight"] == 1:
                break
            threading.Event().wait(0.05)
        else:
            raise AssertionError("a request whose body is still uploading is not counted in flight")
        streams = start_streams(url, 3, 200)

        proc.send_signal(signal.SIGTERM)
        assert wait_ready_status(url, 503).json()["status"] == "draining"
        refused = httpx.post(
            f"{url}/v1/chat/completions", json=chat_body(7, 8, stream=False), timeout=30
        )
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert (
            error["type"] == "service_unavailable"
            and error["code"] == "draining"
            and error["message"]
        )
        assert httpx.get(f"{url}/health").status_code == 200  # liveness holds while draining
        assert proc.poll() is None

        sock.sendall(last_byte)  # the held request was in flight before the signal: it is served
        status, body = read_response(sock)
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        for s in streams:
            s.join(120)
            assert s.error is None and s.events[-1] == "[DONE]" and s.finish_reason == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [
        LogStore(tmp_path / "guard.db").get(row.id)
        for row in LogStore(tmp_path / "guard.db").list(limit=50)
    ]
    assert len(records) == 4 and {r.outcome for r in records} == {"clean"}
    assert all(r.finish_reason == "length" and r.firings for r in records)
    assert "drained: shutting down" in (tmp_path / "server.log").read_text()


def test_past_the_grace_period_streams_end_with_an_error_and_are_logged_interrupted(
    tmp_path, monkeypatch
):
    policy = flag_everything_policy(tmp_path)
    proc, url = serve_in_subprocess([policy], tmp_path / "server.log", "--drain-grace", "0")
    try:
        # Each stream must outlast the signal: 400 tokens (EOS banned) at 1/3 of the engine's rate.
        streams = start_streams(url, 3, 400)
        proc.send_signal(signal.SIGTERM)
        for s in streams:
            s.join(120)
            assert s.error is None and s.events[-1] == "[DONE]"
            error = s.events[-2]["error"]
            assert error["type"] == "service_unavailable" and error["code"] == "interrupted"
            assert s.finish_reason is None
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    store = LogStore(tmp_path / "guard.db")
    records = [store.get(row.id) for row in store.list(limit=50)]
    assert len(records) == 3 and {r.outcome for r in records} == {"interrupted"}
    seen = sorted((s.text for s in streams), key=len, reverse=True)
    for r in records:
        assert r.finish_reason is None and 0 < len(r.output_ids) < 400 and r.firings
    # The log keeps at least what each client was shown (the generation ran on until it was cancelled).
    finals = [r.final_text for r in records]
    for text in seen:
        match = next(f for f in finals if f.startswith(text))
        finals.remove(match)
    assert "interrupted 3 generation(s)" in (tmp_path / "server.log").read_text()
    # A replica serving the same log lists and shows them (the review API knows the outcome).
    monkeypatch.setenv("GUARD_ADMIN_KEY", "admin-key-for-the-drain-test")
    proc, url = serve_in_subprocess([policy], tmp_path / "server2.log")
    try:
        auth = {"Authorization": "Bearer admin-key-for-the-drain-test"}
        listed = httpx.get(
            f"{url}/v1/guard/review/logs", params={"outcome": "interrupted"}, headers=auth
        ).json()
        assert listed["total"] == 3 and {i["outcome"] for i in listed["items"]} == {"interrupted"}
        shown = httpx.get(f"{url}/v1/guard/review/logs/{listed['items'][0]['id']}", headers=auth)
        assert shown.status_code == 200 and shown.json()["record"]["outcome"] == "interrupted"
    finally:
        proc.terminate()
        proc.wait(60)


def test_serve_settings_come_from_the_environment(monkeypatch):
    from guard.errors import InvalidRequestError
    from server.app import ServerSettings

    monkeypatch.setenv("GUARD_LOG_URL", "postgresql://guard@db:5432/guard")
    monkeypatch.setenv("GUARD_DRAIN_GRACE_S", "12.5")
    s = ServerSettings.from_env(["p.yaml"])
    assert (s.log_url, s.drain_grace_s) == ("postgresql://guard@db:5432/guard", 12.5)
    assert ServerSettings.from_env(["p.yaml"], log_url="x.db", drain_grace_s=0).log_url == "x.db"
    monkeypatch.setenv("GUARD_DRAIN_GRACE_S", "soon")
    with pytest.raises(InvalidRequestError, match="GUARD_DRAIN_GRACE_S"):
        ServerSettings.from_env(["p.yaml"])
    monkeypatch.setenv("GUARD_DRAIN_GRACE_S", "-1")
    with pytest.raises(ValueError, match="drain_grace_s"):
        ServerSettings.from_env(["p.yaml"])
    monkeypatch.delenv("GUARD_LOG_URL")
    monkeypatch.delenv("GUARD_DRAIN_GRACE_S")
    assert (
        ServerSettings.from_env(["p.yaml"]).log_url,
        ServerSettings.from_env(["p.yaml"]).drain_grace_s,
    ) == (None, 30.0)
