"""Hostile input against a real server: oversized bodies, too many messages, characters or
generations, text that cannot be encoded. Each is a 4xx OpenAI error naming ``param``, never a 5xx,
and none holds the event loop: ``/health`` answers while a 10 MB request is being refused. Also the
tenant boundary of ``/health`` and ``/v1/models``."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from test_server import LiveServer, write_policy

from server.app import ServerSettings
from server.limits import RequestLimits

MODEL = "tiny"
LIMITS = RequestLimits(
    max_body_bytes=64 * 1024,
    max_messages=8,
    max_chars=2000,
    max_prompt_tokens=400,
    max_generations=4,
)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    policy = write_policy(tmp_path_factory.mktemp("hostile"), tiny_model_dir)
    with LiveServer(ServerSettings(policy_paths=(str(policy),), limits=LIMITS)) as server:
        yield server


def post(live, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
    return err


SURROGATE = '"\\ud800"'
SURROGATE_CASES = [  # (path, raw JSON body, param)
    (
        "/v1/chat/completions",
        f'{{"model":"{MODEL}","messages":[{{"role":"user","content":{SURROGATE}}}]}}',
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        (
            f'{{"model":"{MODEL}","messages":[{{"role":"system","content":{SURROGATE}}},'
            '{"role":"user","content":"hi"}]}'
        ),
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        (
            f'{{"model":"{MODEL}","messages":[{{"role":"user","content":'
            f'[{{"type":"text","text":{SURROGATE}}}]}}]}}'
        ),
        "messages.0.content.0.text",
    ),
    (
        "/v1/chat/completions",
        f'{{"model":{SURROGATE},"messages":[{{"role":"user","content":"hi"}}]}}',
        "model",
    ),
    ("/v1/completions", f'{{"model":"{MODEL}","prompt":{SURROGATE}}}', "prompt"),
    ("/v1/completions", f'{{"model":"{MODEL}","prompt":["ok",{SURROGATE}]}}', "prompt"),
    ("/v1/completions", f'{{"model":{SURROGATE},"prompt":"hi"}}', "model"),
]


@pytest.mark.parametrize("path,body,param", SURROGATE_CASES)
def test_a_lone_surrogate_is_a_400_naming_the_field(live, path, body, param):
    r = post(live, path, content=body, headers={"content-type": "application/json"})
    assert "surrogate" in assert_error(r, 400, param)["message"]
    assert (
        post(
            live, "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 1}
        ).status_code
        == 200
    )


def test_a_body_over_the_limit_is_413_from_its_content_length(live):
    r = post(
        live,
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]},
    )
    assert assert_error(r, 413, "body")["code"] == "request_too_large"


def test_a_chunked_body_over_the_limit_is_413_without_reading_it_all(live):
    sent = []

    def body():
        for _ in range(1000):  # 8 MB if it were all read
            sent.append(1)
            yield b" " * 8192

    r = post(
        live, "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert_error(r, 413, "body")
    assert len(sent) < 1000, "the server read the whole body"


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {"messages": HI * 9}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "y" * 1500}] * 2},
            "messages.1.content",
        ),
        ("/v1/chat/completions", {"messages": HI, "n": 5}, "n"),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, "n"),
        ("/v1/completions", {"prompt": ["z" * 1500, "z" * 1500]}, "prompt.1"),
        (
            "/v1/completions",
            {"prompt": "hello " * 300},
            "prompt",
        ),  # under max_chars, over max_prompt_tokens
    ],
)
def test_limits_are_400_naming_the_field(live, path, body, param):
    assert_error(post(live, path, json={"model": MODEL, **body}), 400, param)


def test_health_answers_while_a_10_mb_request_is_refused(tiny_model_dir, tmp_path):
    """A 10 MB chat message under limits that let it through to the service: it is refused as too
    long for the context without being tokenised, and while the service prepares it (held there,
    in its thread, until /health has answered) /health answers."""
    policy = write_policy(tmp_path, tiny_model_dir)
    big = RequestLimits(
        max_body_bytes=16 * 1024 * 1024, max_chars=12_000_000, max_prompt_tokens=10**8
    )
    with LiveServer(ServerSettings(policy_paths=(str(policy),), limits=big)) as server:
        service = _app_service(server)
        preparing, asked = threading.Event(), threading.Event()
        prepare, tok = service.prepare, service.resolve(MODEL).engine.tokenizer
        encoded = []
        tok.encode_chat = lambda messages, f=tok.encode_chat: encoded.append(1) or f(messages)

        def observed(req):
            preparing.set()
            assert asked.wait(120), "/health was never asked"
            return prepare(req)

        service.prepare = observed
        result: dict = {}

        def send():
            body = {"model": MODEL, "messages": [{"role": "user", "content": "a b " * 2_500_000}]}
            result["r"] = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert preparing.wait(120)
            latencies = []
            for _ in range(3):
                t0 = time.perf_counter()
                assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
                latencies.append(time.perf_counter() - t0)
        finally:
            asked.set()
            sender.join(300)
        err = assert_error(result["r"], 400, "messages")
        assert err["code"] == "context_length_exceeded" and not encoded, (
            "a prompt that cannot fit was tokenised"
        )
        # The service's prepare waited for /health to answer: on the event loop that would deadlock (and
        # time out). The 100 ms target is measured by bench/hostile.py; a test on a shared machine only
        # bounds it loosely (the 10 MB request used to hold the loop for 11.8 s).
        assert min(latencies) < 2.0, latencies


def _app_service(server):
    return (
        server.server.config.loaded_app.app.state.service
    )  # the FastAPI app behind uvicorn's wrappers


def test_public_health_names_nothing_and_detail_is_for_operators(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("GUARD_ADMIN_KEY", raising=False)
    policy = write_policy(tmp_path, tiny_model_dir)
    with LiveServer(
        ServerSettings(policy_paths=(str(policy),), api_keys=("k1",), admin_key="adm")
    ) as server:
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert (
            httpx.get(
                f"{server.url}/health/detail", headers={"Authorization": "Bearer k1"}
            ).status_code
            == 401
        )
        detail = httpx.get(
            f"{server.url}/health/detail", headers={"Authorization": "Bearer adm"}
        ).json()
        assert detail["models"][0]["id"] == MODEL and detail["models"][0]["source"] == str(
            policy.resolve()
        )
    with LiveServer(ServerSettings(policy_paths=(str(policy),), api_keys=("k1",))) as server:
        r = httpx.get(f"{server.url}/health/detail", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 404, "keys but no admin key: no detail view for anyone"
        assert (
            httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer k1"}).status_code
            == 404
        )


def test_a_tenant_model_card_names_only_its_own_policy(tiny_model_dir, tmp_path):
    from test_access import write_policy as tenant_policy

    paths = [
        tenant_policy(tmp_path, tiny_model_dir, "tenant-a", "access: {api_keys: [key-a]}\n"),
        tenant_policy(tmp_path, tiny_model_dir, "tenant-b", "access: {api_keys: [key-b]}\n"),
    ]
    with LiveServer(ServerSettings(policy_paths=tuple(str(p) for p in paths))) as server:
        for key, own in (("key-a", "tenant-a"), ("key-b", "tenant-b")):
            cards = httpx.get(
                f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}
            ).json()["data"]
            assert [(c["id"], c["policy"], c["root"]) for c in cards] == [(own, own, own)]
            other = "tenant-b" if own == "tenant-a" else "tenant-a"
            assert other not in str(cards)
