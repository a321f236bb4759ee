"""``/v1/responses`` and ``/openapi.json`` on a live server (random-weight Llama), through the
official ``openai`` client's Responses API."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_server import LiveServer, write_policy

from server.app import ServerSettings

MODEL = "tiny"


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    policy = write_policy(tmp_path_factory.mktemp("policy"), tiny_model_dir)
    with LiveServer(ServerSettings(policy_paths=(str(policy),))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat_text(client, messages, seed, max_tokens=12) -> str:
    return (
        client.chat.completions.create(
            model=MODEL, messages=messages, seed=seed, max_tokens=max_tokens
        )
        .choices[0]
        .message.content
    )


def test_create_matches_chat_completions(client):
    r = client.responses.create(
        model=MODEL,
        input="Hello there",
        instructions="Be brief.",
        max_output_tokens=12,
        extra_body={"seed": 5},
    )
    assert (
        r.object == "response"
        and r.id.startswith("resp_")
        and r.model == MODEL
        and r.store is False
    )
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert r.output_text == _chat_text(client, msgs, 5)
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message"
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.guard["outcome"] == "clean" and r.guard["resets"] == 0


def test_input_as_a_message_list(client):
    items = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hey"}]},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "How are you?"}],
        },
    ]
    r = client.responses.create(
        model=MODEL,
        input=items,
        max_output_tokens=10,
        temperature=0.7,
        top_p=0.9,
        store=False,
        extra_body={"seed": 2},
    )
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "How are you?"},
    ]
    expected = (
        client.chat.completions.create(
            model=MODEL, messages=msgs, seed=2, max_tokens=10, temperature=0.7, top_p=0.9
        )
        .choices[0]
        .message.content
    )
    assert r.output_text == expected and r.temperature == 0.7 and r.top_p == 0.9


def test_stream_events_follow_the_responses_protocol(client):
    whole = client.responses.create(
        model=MODEL, input="Hello there", max_output_tokens=12, extra_body={"seed": 7}
    )
    events = list(
        client.responses.create(
            model=MODEL,
            input="Hello there",
            max_output_tokens=12,
            stream=True,
            extra_body={"seed": 7},
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete",
    ]
    assert set(kinds[4:-4]) <= {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.guard["outcome"] == "clean"
    # The SDK's accumulating helper reads the same events (its final response needs response.completed,
    # so it is only checked there, as with OpenAI's own incomplete responses).
    with client.responses.stream(
        model=MODEL, input="Hello there", max_output_tokens=12, extra_body={"seed": 7}
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    assert text == whole.output_text


@pytest.mark.parametrize(
    "field,value",
    [
        ("tools", [{"type": "function", "name": "f", "parameters": {}}]),
        ("previous_response_id", "resp_1"),
        ("background", True),
        ("store", True),
        ("conversation", "conv_1"),
        ("text", {"format": {"type": "json_object"}}),
        ("reasoning", {"effort": "low"}),
    ],
)
def test_unsupported_features_are_a_400_naming_the_param(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="Hi", extra_body={field: value})
    assert err.value.status_code == 400 and err.value.body["param"] == field
    assert "supported" in err.value.body["message"] or "store" in err.value.body["message"]


def test_bad_input_items_and_unknown_models(client, live):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model=MODEL, input=[{"type": "function_call_output", "call_id": "c", "output": "x"}]
        )
    assert err.value.body["param"] == "input.0.type"
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="nope", input="Hi")
    assert err.value.body["param"] == "model"
    r = httpx.post(
        f"{live.url}/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 10**6}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"


def test_openapi_documents_real_statuses_and_stream_schemas(live):
    schema = httpx.get(f"{live.url}/openapi.json").json()
    paths, components = schema["paths"], schema["components"]["schemas"]
    assert "422" not in str(
        {p: {m: op["responses"] for m, op in ops.items()} for p, ops in paths.items()}
    )
    assert "HTTPValidationError" not in components
    for path, body, event in [
        ("/v1/chat/completions", "ChatCompletion", "ChatCompletionChunk"),
        ("/v1/completions", "Completion", "Completion"),
        ("/v1/responses", "ResponseObject", "TextDeltaEvent"),
    ]:
        op = paths[path]["post"]["responses"]
        assert {"200", "400", "401", "404"} <= set(op)
        assert op["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert op["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)
        assert event in str(op["200"]["content"]["text/event-stream"])
    chunk_guard = str(components["ChatCompletionChunkChoice"]["properties"]["guard"])
    assert all(n in chunk_guard for n in ("ResetNotice", "CutNotice", "GuardInfo"))
    assert paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("/ModelList")
    assert "404" in paths["/v1/models/{model}"]["get"]["responses"]
    assert "guard_resets" in components["StreamOptions"]["properties"]
