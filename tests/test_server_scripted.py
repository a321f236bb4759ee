"""The server's wire format for what a random model never does (resets, refusals, failures),
driven by a scripted service: each generation replays the next enqueued list of events."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass

import openai
import pytest
from fastapi.testclient import TestClient

from guard.controller.events import Failed, Finished, Reset, TextDelta, Usage
from guard.errors import NotFoundError, OverloadedError
from guard.service import GenerationRequest, ServedModel
from server.app import create_app
from server.routes import get_service
from server.serving import INLINE_PREPARE_CHARS

MODEL = "scripted"


@dataclass
class Prepared:
    request: GenerationRequest
    prompt_tokens: int = 3
    model: str = MODEL

    @property
    def request_id(self) -> str:
        return self.request.request_id


class ScriptedService:
    """A stand-in for GuardService whose generations replay enqueued event lists."""

    def __init__(self) -> None:
        self.scripts: list[list] = []
        self.requests: list[GenerationRequest] = []
        self.threads: list[threading.Thread] = []
        """The thread of each prepare and stream call, in order."""

    def enqueue(self, *scripts: list) -> None:
        self.scripts.extend(scripts)

    def list_models(self) -> list[ServedModel]:
        return [ServedModel(id=MODEL, created=0, policy=MODEL, root="none")]

    def prepare(self, req: GenerationRequest) -> Prepared:
        if req.model != MODEL:
            raise NotFoundError(f"The model `{req.model}` does not exist.", param="model")
        self.requests.append(req)
        self.threads.append(threading.current_thread())
        return Prepared(req)

    async def stream(self, prepared: Prepared):
        self.threads.append(threading.current_thread())  # the event loop's
        for item in self.scripts.pop(0):
            await asyncio.sleep(0)
            if isinstance(item, Exception):
                raise item
            yield item

    def health(self) -> dict:
        return {"status": "ok"}

    def key_bindings(self) -> dict[str, frozenset[str]]:
        return {}


def finished(
    text: str,
    outcome: str = "clean",
    resets: int = 0,
    reason: str = "stop",
    log_id: str | None = None,
    fired: tuple[str, ...] = (),
) -> Finished:
    return Finished(
        text=text,
        finish_reason=reason,
        outcome=outcome,
        resets=resets,
        usage=Usage(prompt_tokens=3, completion_tokens=len(text.split()), generated_tokens=9),
        log_id=log_id,
        monitors_fired=fired,
    )


RECOVERED = [
    TextDelta("Sure. ", (1,)),
    TextDelta("Step one: bad", (2, 3)),
    Reset(retract_tokens=2, retract_chars=13, monitor="harm-probe", retry=1, marker="[RESET]"),
    TextDelta("I'd rather not.", (4,)),
    finished("Sure. I'd rather not.", "recovered", 1, log_id="log-7", fired=("harm-probe",)),
]
REFUSED = [
    TextDelta("Step", (1,)),
    Reset(1, 4, "harm-probe", 1),
    Reset(0, 0, "harm-probe", 2),
    TextDelta("I can't help with that.", (5,)),
    finished("I can't help with that.", "refused", 2, log_id="log-8", fired=("harm-probe",)),
]

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def service() -> ScriptedService:
    return ScriptedService()


@pytest.fixture()
def http(service):
    with TestClient(
        create_app(service_factory=lambda: service), raise_server_exceptions=False
    ) as client:
        yield client


@pytest.fixture()
def client(http) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
    )


def sse_events(http: TestClient, path: str, body: dict) -> list:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_reset_chunk_on_the_wire(http, service):
    service.enqueue(RECOVERED)
    chunks = sse_events(
        http, "/v1/chat/completions", {"model": MODEL, "messages": HI, "stream": True}
    )
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert choices[3] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": None,
        "guard": {
            "reset": {
                "retract_chars": 13,
                "retract_tokens": 2,
                "monitor": "harm-probe",
                "retry": 1,
                "marker": "[RESET]",
            }
        },
    }
    assert choices[-1]["finish_reason"] == "stop"
    assert choices[-1]["guard"] == {
        "outcome": "recovered",
        "resets": 1,
        "log_id": "log-7",
        "monitors_fired": ["harm-probe"],
        "generated_tokens": 9,
    }
    assert all("guard" not in c for c in choices[:3] + choices[4:-1])


def test_every_chunk_of_a_stream_carries_one_created(http, service, monkeypatch):
    """Opening, text, reset, finish and usage chunks share the response's id and ``created``, as
    vLLM's do, even when the clock moves on between them."""
    ticks = itertools.count(1_700_000_000)
    monkeypatch.setattr(time, "time", lambda: float(next(ticks)))
    for path, body in [
        ("/v1/chat/completions", {"messages": HI}),
        ("/v1/completions", {"prompt": "x"}),
    ]:
        service.enqueue(RECOVERED)
        body |= {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}}
        chunks = sse_events(http, path, body)
        assert len(chunks) >= 5 and chunks[-1]["usage"] is not None
        assert len({(c["id"], c["created"]) for c in chunks}) == 1


def test_client_applying_resets_holds_the_final_text(client, service):
    service.enqueue(RECOVERED)
    shown = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=HI, stream=True):
        choice = chunk.choices[0]
        reset = (getattr(choice, "guard", None) or {}).get("reset")
        if reset:
            shown = shown[: len(shown) - reset["retract_chars"]]
        shown += choice.delta.content or ""
    assert shown == RECOVERED[-1].text


def test_non_streaming_carries_final_text_and_guard(client, service):
    service.enqueue(RECOVERED)
    resp = client.chat.completions.create(model=MODEL, messages=HI)
    assert resp.choices[0].message.content == "Sure. I'd rather not."
    assert resp.choices[0].guard == {
        "outcome": "recovered",
        "resets": 1,
        "log_id": "log-7",
        "monitors_fired": ["harm-probe"],
        "generated_tokens": 9,
    }
    assert resp.usage.completion_tokens == 4 and resp.usage.prompt_tokens == 3


def test_refusal_is_content_filter(client, service):
    service.enqueue(REFUSED, REFUSED)
    resp = client.chat.completions.create(model=MODEL, messages=HI)
    assert resp.choices[0].finish_reason == "content_filter"
    assert resp.choices[0].guard["outcome"] == "refused"
    last = list(client.completions.create(model=MODEL, prompt="x", stream=True))[-1]
    assert (
        last.choices[0].finish_reason == "content_filter" and last.choices[0].guard["resets"] == 2
    )


def test_completion_reset_chunk(http, service):
    service.enqueue(RECOVERED)
    chunks = sse_events(
        http,
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": True}},
    )
    assert (
        chunks[2]["choices"][0]["text"] == ""
        and chunks[2]["choices"][0]["guard"]["reset"]["retract_chars"] == 13
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }


def test_failure_mid_stream_is_an_error_event_then_done(http, client, service):
    service.enqueue([TextDelta("a", (1,)), Failed(OverloadedError("engine queue is full"))])
    chunks = sse_events(
        http, "/v1/chat/completions", {"model": MODEL, "messages": HI, "stream": True}
    )
    assert chunks[-1] == {
        "error": {
            "message": "engine queue is full",
            "type": "server_overloaded",
            "param": None,
            "code": None,
        }
    }
    service.enqueue([TextDelta("a", (1,)), Failed(OverloadedError("engine queue is full"))])
    with pytest.raises(openai.APIError, match="engine queue is full"):
        list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))


def test_failure_without_stream_keeps_its_status(http, service):
    service.enqueue([Failed(OverloadedError("engine queue is full"))])
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_overloaded"


def test_unexpected_exception_is_a_generic_500(http, service, caplog):
    service.enqueue([RuntimeError("secret internals")])
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
    assert r.status_code == 500 and "secret" not in r.text
    assert r.json()["error"]["type"] == "internal_error"
    assert "secret internals" in caplog.text
    service.enqueue([RuntimeError("secret internals")])
    chunks = sse_events(
        http, "/v1/chat/completions", {"model": MODEL, "messages": HI, "stream": True}
    )
    assert chunks[-1]["error"]["type"] == "internal_error" and "secret" not in json.dumps(chunks)


def test_request_becomes_generation_requests(client, service):
    service.enqueue(*[[finished(str(i))] for i in range(3)])
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        n=3,
        seed=10,
        stop="END",
        max_completion_tokens=7,
        max_tokens=99,
        logit_bias={"5": -100},
        extra_body={"top_k": 4, "stop_token_ids": [1], "banned_token_ids": [2, 3]},
    )
    assert [c.message.content for c in resp.choices] == ["0", "1", "2"]
    assert resp.usage.prompt_tokens == 3, "n choices share one prompt"
    first = service.requests[0]
    assert first.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert (first.max_tokens, first.stop, first.top_k, first.stop_token_ids) == (
        7,
        ("END",),
        4,
        (1,),
    )
    assert first.logit_bias == {5: -100.0} and first.banned_token_ids == frozenset({2, 3})
    assert [r.seed for r in service.requests] == [10, 11, 12]
    assert len({r.request_id for r in service.requests}) == 3


def test_models_and_dependency_override(http):
    other = ScriptedService()
    other.list_models = lambda: [ServedModel(id="other", created=1)]
    http.app.dependency_overrides[get_service] = lambda: other
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["other"]
    assert http.get("/v1/models/other").json()["object"] == "model"
    r = http.get("/v1/models/missing")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_wrong_method_is_openai_405(http):
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_choice_opens_with_its_first_event(http, service):
    """As vLLM does: the role chunk travels with the choice's first output, not ahead of it, so a
    client timing the first chunk (vLLM's bench) times the first output."""
    service.enqueue([TextDelta("a", (1,)), finished("a")], [TextDelta("b", (2,)), finished("b")])
    chunks = sse_events(
        http, "/v1/chat/completions", {"model": MODEL, "messages": HI, "stream": True, "n": 2}
    )
    for index, text in ((0, "a"), (1, "b")):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[1]["delta"] == {"content": text}
        assert chunks.index(next(c for c in chunks if c["choices"][0] is mine[1])) == (
            chunks.index(next(c for c in chunks if c["choices"][0] is mine[0])) + 1
        )
    service.enqueue([Failed(OverloadedError("engine queue is full"))])
    failed = sse_events(
        http, "/v1/chat/completions", {"model": MODEL, "messages": HI, "stream": True}
    )
    assert len(failed) == 1 and failed[0]["error"]["type"] == "server_overloaded"


@pytest.mark.parametrize("chars", [INLINE_PREPARE_CHARS, INLINE_PREPARE_CHARS + 1])
def test_only_a_short_prompt_is_tokenised_on_the_event_loop(client, service, chars):
    """Preparing (tokenising) holds the thread it runs on: a prompt up to INLINE_PREPARE_CHARS
    characters is prepared on the event loop (no thread hand-off), a longer one in another thread
    so that it cannot stall the other streams."""
    service.enqueue([TextDelta("ok", (1,)), finished("ok")])
    messages = [
        {"role": "system", "content": "s" * 10},
        {"role": "user", "content": "u" * (chars - 10)},
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages)
    assert out.choices[0].message.content == "ok"
    prepared_in, loop = service.threads
    assert (prepared_in is loop) == (chars <= INLINE_PREPARE_CHARS)


def test_a_silent_generation_ends_when_its_client_leaves():
    """A generation that sends nothing for a long time (a hold-back, a slow engine): the client's
    leaving is still noticed, the events end without an error and the generation is cancelled."""
    from server.serving import GuardedServing

    closed: list[bool] = []

    class Silent:
        async def stream(self, prepared):
            try:
                await asyncio.Event().wait()  # never set: no event ever comes
                yield None
            finally:
                closed.append(True)

    asks = 0

    async def is_disconnected() -> bool:
        nonlocal asks
        asks += 1
        return asks >= 2  # there for the first question, gone by the second

    async def run() -> list:
        serving = GuardedServing(Silent(), disconnect_poll_s=0.001)  # type: ignore[arg-type]
        return [event async for event in serving.events([object()], is_disconnected)]

    # the timeout only keeps a regression from hanging the suite; the test waits on the events
    assert asyncio.run(asyncio.wait_for(run(), 60)) == []
    assert asks == 2 and closed == [True]
