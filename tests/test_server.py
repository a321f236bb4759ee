"""The server end to end: a real uvicorn serving a real GuardService on a random-weight Llama,
driven by the official ``openai`` client (and raw httpx where the client would hide the wire)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from server.app import ServerSettings, create_app

MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_policy(dir: Path, model_dir: Path, name: str = MODEL) -> Path:
    path = dir / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmodel: {{engine: transformers, path: {model_dir}}}\nmonitors: []\n"
        "backtrack: {rollback: sentence, max_retries: 3, on_exhausted: refuse}\n"
        f"stream: {{holdback_tokens: 8}}\nlog: {{path: {dir / 'guard.db'}}}\n"
    )
    return path


class LiveServer:
    """uvicorn on a free loopback port, in a thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    policy = write_policy(tmp_path_factory.mktemp("policy"), tiny_model_dir)
    with LiveServer(ServerSettings(policy_paths=(str(policy),))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def eos_id(tiny_model_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("<|end|>")


HI = [{"role": "user", "content": "Hello there, how are you?"}]


def test_chat_completion(client):
    resp = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, seed=1)
    choice = resp.choices[0]
    assert (
        resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")
    )
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert choice.guard == {
        "outcome": "clean",
        "resets": 0,
        "log_id": None,
        "monitors_fired": [],
        "generated_tokens": resp.usage.completion_tokens,
    }
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_chat_with_usage(client):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=20, seed=3)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    last_choice = [c for c in chunks if c.choices][-1].choices[0]
    assert last_choice.finish_reason in ("stop", "length")
    assert last_choice.guard["outcome"] == "clean" and last_choice.guard["resets"] == 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(live):
    body = {"model": MODEL, "messages": HI, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [
            line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")
        ]
    assert events[-1] == "[DONE]"
    assert all("choices" in json.loads(e) for e in events[:-1])


def test_completions(client):
    resp = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, seed=0
    )
    assert resp.object == "text_completion" and len(resp.choices) == 1
    assert isinstance(resp.choices[0].text, str) and resp.choices[0].guard["outcome"] == "clean"
    batch = client.completions.create(
        model=MODEL, prompt=["Hello", [5, 6, 7]], n=2, max_tokens=4, seed=0
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    streamed = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, seed=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_n_choices_and_seed_determinism(client):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=16, n=2, seed=42, temperature=1.0)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1], "choice i must use seed + i"
    single = client.chat.completions.create(**{**kwargs, "n": 1, "seed": 43})
    assert single.choices[0].message.content == texts[1]


def test_streaming_n_interleaves_by_index(client):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=10, n=2, seed=5)
    whole = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    texts, finished = ["", ""], set()
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert texts == whole and finished == {0, 1}


def test_stop_string(client):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=30, temperature=1.0)
    for seed in range(20):
        full = client.chat.completions.create(**kwargs, seed=seed).choices[0].message.content
        if len(full.strip()) >= 6:
            break
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    resp = client.chat.completions.create(**kwargs, seed=seed, stop=[stop])
    assert resp.choices[0].message.content == full[: full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(client, eos_id):
    resp = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=5, seed=0, extra_body={"banned_token_ids": [eos_id]}
    )
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 5


def test_vendor_fields_through_extra_body(client):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=8, seed=9)
    greedy = client.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
    top1 = (
        client.chat.completions.create(**kwargs, extra_body={"top_k": 1}).choices[0].message.content
    )
    assert top1 == greedy
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs, extra_body={"stop_token_ids": [10**6]})
    assert err.value.body["param"] == "stop_token_ids"


# -- errors: always OpenAI error JSON with the right status, never a 500 ------------------------


def _post(live, path: str, timeout: float = 60, **kw) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", timeout=timeout, **kw)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": HI, "temperature": 5}, "temperature"),
        ({"model": MODEL, "messages": HI, "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": HI, "n": 9}, "n"),
        ({"model": MODEL, "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": HI, "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": MODEL, "messages": HI, "logprobs": True}, "logprobs"),
        ({"model": MODEL, "messages": HI, "top_k": "5"}, "top_k"),
        (
            {"model": MODEL, "messages": HI, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": MODEL, "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": HI, "max_tokens": 100000}, "max_tokens"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"messages": HI}, "model"),
    ],
)
def test_bad_chat_values_are_400_with_param(live, body, param):
    r = _post(live, "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "prompt": [-1]}, "prompt.0"),
        ({"model": MODEL, "prompt": [10**6]}, "prompt"),
        ({"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
        ({"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of"),
    ],
)
def test_bad_completion_values_are_400_with_param(live, body, param):
    r = _post(live, "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'"text"'])
def test_malformed_body_is_400(live, content):
    r = _post(
        live, "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=HI)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # a stream fails before its first byte
        client.chat.completions.create(model="nope", messages=HI, stream=True)


def test_prompt_longer_than_context(client):
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 200}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=long)
    assert (
        err.value.body["code"] == "context_length_exceeded"
        and err.value.body["param"] == "messages"
    )


def test_unknown_route_is_openai_404(live):
    r = httpx.get(f"{live.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


def test_unknown_fields_are_ignored(live):
    r = _post(
        live,
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HI, "max_tokens": 2, "some_future_param": {"x": 1}},
    )
    assert r.status_code == 200


def _stats(live) -> dict:
    return httpx.get(f"{live.url}/health/detail").json()


def _assert_cancelled(live, tokens_before: int, max_tokens: int) -> None:
    deadline = time.monotonic() + 5
    while _stats(live)["active_generations"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _stats(live)
    assert after["active_generations"] == 0
    assert after["engine_stats"][0]["output_tokens"] - tokens_before < max_tokens, (
        "the generation ran to the end"
    )


def test_client_disconnect_mid_stream_cancels_the_generation(live, eos_id):
    before = _stats(live)["engine_stats"][0]["output_tokens"]
    body = {
        "model": MODEL,
        "messages": HI,
        "max_tokens": 480,
        "stream": True,
        "banned_token_ids": [eos_id],
    }
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        while '"content"' not in next(lines):
            pass
        assert _stats(live)["active_generations"] == 1
    _assert_cancelled(live, before, 480)


def test_client_disconnect_cancels_a_non_streaming_request(live, eos_id):
    """The client hangs up once its generations are running (an event, not a timeout: on a fast
    machine the whole answer can be ready within any fixed client timeout)."""
    before = _stats(live)["engine_stats"][0]["output_tokens"]
    body = json.dumps(
        {"model": MODEL, "messages": HI, "max_tokens": 480, "n": 2, "banned_token_ids": [eos_id]}
    ).encode()
    host, port = httpx.URL(live.url).host, httpx.URL(live.url).port
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while _stats(live)["active_generations"] < 2:
            assert time.monotonic() < deadline, "the generations never started"
        # hang up without reading the answer
    _assert_cancelled(live, before, 2 * 480)


def test_health(live):
    health = httpx.get(f"{live.url}/health/detail").json()
    assert health["status"] == "ok" and health["models"][0]["id"] == MODEL


def test_api_keys(tiny_model_dir, tmp_path):
    policy = write_policy(tmp_path, tiny_model_dir)
    with LiveServer(ServerSettings(policy_paths=(str(policy),), api_keys=("k1",))) as server:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.get(f"{server.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k1", max_retries=0)
        assert ok.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices
        assert httpx.get(f"{server.url}/health").status_code == 200
