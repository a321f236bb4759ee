"""vLLM's request extensions on guard's endpoints (transformers engine; the vLLM engine's side is
in tests/test_vllm.py): the sampling ones are honoured, every other one is a 400 naming it unless
it holds vLLM's default. Never silently ignored."""

from __future__ import annotations

import httpx
import pytest
import torch

from guard.controller.backtrack import GuardedGeneration
from guard.controller.record import GenerationRecord
from guard.errors import InvalidRequestError
from guard.policy.build import default_controller_config
from guard.sampling import SamplingParams, make_generator, sample
from server.app import ServerSettings
from tests.conftest import generation_record
from tests.test_server import HI, MODEL, LiveServer, write_policy


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    policy = write_policy(tmp_path_factory.mktemp("policy"), tiny_model_dir)
    with LiveServer(ServerSettings(policy_paths=(str(policy),))) as server:
        yield server


@pytest.fixture(scope="module")
def eos_id(tiny_engine) -> int:
    return next(iter(tiny_engine.info.eos_token_ids))


def _chat(live, **body) -> httpx.Response:
    return httpx.post(
        f"{live.url}/v1/chat/completions",
        timeout=120,
        json={"model": MODEL, "messages": HI, "max_tokens": 12, "seed": 3, **body},
    )


def run(engine, params: SamplingParams, text: str = "Hello there") -> GenerationRecord:
    """One guarded generation without monitors, to the end."""
    rec = generation_record(request_id="t", prompt=text)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": text}])
    job = GuardedGeneration(
        engine,
        prompt,
        params,
        [],
        default_controller_config(holdback_tokens=0),
        rec,
        emit=lambda e: None,
    )
    while not job.advance():
        pass
    job.close()
    return rec


# -- the sampler ---------------------------------------------------------------------------------


def test_repetition_penalty_is_vllms_over_the_whole_history():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # token 3 (3.0 -> 1.5) and token 1 (-1.0 -> -2.0) were seen; token 0 now wins
    assert sample(logits, params, make_generator(0), history=[3, 1]) == 0
    assert sample(logits, params, make_generator(0), history=[]) == 3


def test_min_p_drops_unlikely_tokens_and_allowed_token_ids_restrict():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, min_p=0.5)  # keeps p >= 0.25: tokens 0 and 1
    drawn = {sample(logits, params, make_generator(s)) for s in range(200)}
    assert drawn == {0, 1}
    allowed = SamplingParams(temperature=1.0, allowed_token_ids=frozenset({2, 3}))
    assert {sample(logits, allowed, make_generator(s)) for s in range(200)} == {2, 3}


def test_bad_extension_values_name_their_parameter():
    for kwargs, param in (
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"allowed_token_ids": frozenset()}, "allowed_token_ids"),
    ):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(**kwargs)
        assert err.value.param == param


# -- the controller on the transformers engine ----------------------------------------------------


def test_ignore_eos_and_min_tokens_keep_generating_past_end_of_sequence(tiny_engine, eos_id):
    eos_first = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={eos_id: 100.0})
    plain = run(tiny_engine, eos_first)
    assert (plain.output_ids, plain.finish_reason, plain.sampled_tokens) == (
        [],
        "stop",
        1,
    )  # ends at once
    ignoring = run(tiny_engine, eos_first.with_changes(ignore_eos=True))
    assert (
        ignoring.finish_reason == "length" and ignoring.output_ids == [eos_id] * 10
    )  # sampled, kept going
    at_least = run(tiny_engine, eos_first.with_changes(min_tokens=6))
    assert len(at_least.output_ids) == 6 and eos_id not in at_least.output_ids
    assert (
        at_least.finish_reason == "stop" and at_least.sampled_tokens == 7
    )  # the 7th was end-of-sequence


# -- the server --------------------------------------------------------------------------------------


def test_vllm_bench_request_is_honoured(live, eos_id):
    """What ``vllm bench serve`` sends (ignore_eos, max_completion_tokens): the answer has every token."""
    r = _chat(
        live, max_completion_tokens=16, ignore_eos=True, logit_bias={str(eos_id): 100}, stream=False
    )
    assert r.status_code == 200, r.text
    assert (
        r.json()["usage"]["completion_tokens"] == 16
        and r.json()["choices"][0]["finish_reason"] == "length"
    )
    r = _chat(live, max_completion_tokens=16, logit_bias={str(eos_id): 100})
    assert (
        r.json()["usage"]["completion_tokens"] == 0
    )  # without it, end-of-sequence ends the answer


def test_sampling_extensions_reach_the_sampler(live):
    plain = _chat(live, temperature=0).json()["choices"][0]["message"]["content"]
    assert (
        _chat(live, temperature=0, top_k=-1, min_p=0.0, repetition_penalty=1.0).json()["choices"][
            0
        ]["message"]["content"]
        == plain
    )
    penalised = _chat(live, temperature=0, repetition_penalty=1.8)
    assert penalised.status_code == 200
    assert penalised.json()["choices"][0]["message"]["content"] != plain
    for path, body in (
        ("/v1/completions", {"prompt": "Hello", "min_tokens": 2, "min_p": 0.1}),
        (
            "/v1/responses",
            {
                "input": "Hello",
                "ignore_eos": True,
                "repetition_penalty": 1.1,
                "top_k": -1,
                "max_output_tokens": 4,
            },
        ),
    ):
        r = httpx.post(f"{live.url}{path}", timeout=120, json={"model": MODEL, "seed": 1, **body})
        assert r.status_code == 200, (path, r.text)


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"bad_words": ["hello"]}, "bad_words"),
        ("/v1/chat/completions", {"use_beam_search": True}, "use_beam_search"),
        (
            "/v1/chat/completions",
            {"include_stop_str_in_output": True},
            "include_stop_str_in_output",
        ),
        ("/v1/chat/completions", {"skip_special_tokens": False}, "skip_special_tokens"),
        ("/v1/chat/completions", {"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
        ("/v1/chat/completions", {"vllm_xargs": {"a": 1}}, "vllm_xargs"),
        ("/v1/chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
        ("/v1/chat/completions", {"add_generation_prompt": False}, "add_generation_prompt"),
        ("/v1/chat/completions", {"chat_template": "{{ x }}"}, "chat_template"),
        ("/v1/chat/completions", {"min_p": 2}, "min_p"),
        ("/v1/chat/completions", {"min_tokens": 50, "max_tokens": 4}, "min_tokens"),
        ("/v1/chat/completions", {"ignore_eos": "yes"}, "ignore_eos"),
        ("/v1/completions", {"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
        ("/v1/completions", {"add_special_tokens": False}, "add_special_tokens"),
        ("/v1/responses", {"length_penalty": 2.0}, "length_penalty"),
        ("/v1/responses", {"presence_penalty": 1.0}, "presence_penalty"),
    ],
)
def test_unhonoured_vllm_extensions_are_400_naming_them(live, path, extra, param):
    source = {
        "/v1/chat/completions": {"messages": HI},
        "/v1/completions": {"prompt": "Hello"},
        "/v1/responses": {"input": "Hello"},
    }[path]
    r = httpx.post(f"{live.url}{path}", timeout=120, json={"model": MODEL, **source, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_vllm_defaults_of_unhonoured_extensions_are_accepted(live):
    r = _chat(
        live,
        skip_special_tokens=True,
        bad_words=[],
        use_beam_search=False,
        length_penalty=1.0,
        priority=0,
        include_stop_str_in_output=False,
        add_generation_prompt=True,
    )
    assert r.status_code == 200, r.text
