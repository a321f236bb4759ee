"""Real third-party clients against a live ``guard serve``: what each user ends up reading.

The clients are the ones people run (installed from pip, ``test`` extra): the official ``openai``
SDK (sync, async, streamed, Responses), LiteLLM, ``langchain-openai`` (invoke and stream) and
the ``llm`` CLI. None of them knows guard's reset chunks. For harmful prompts of the organism that
make the guard roll back text a reset-aware client had already been shown, each client's final
text must hold nothing the organism's judge calls unsafe and no spliced fragment (it is the
guarded answer, or released text followed by the cut refusal); benign answers must arrive
exactly as the non-streamed answer with the same seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from guard.client import ResetApplier, final_text
from guard.organism.judge import judge
from guard.testing import policy_with_absolute_paths, serve_in_subprocess

openai = pytest.importorskip("openai")
# LiteLLM fetches its model price list from the internet at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

REPO = Path(__file__).resolve().parent.parent
ORGANISM = REPO / "models" / "organism"
REFUSAL = "I can't help with that."
MAX_TOKENS = 96
OPTED = {"stream_options": {"guard_resets": True}}

pytestmark = pytest.mark.skipif(
    not (ORGANISM / "probe" / "probe.json").is_file(),
    reason="models/organism (with its probe) is not built",
)


def _rows(kind: str) -> list[str]:
    rows = [
        json.loads(line)
        for line in (ORGANISM / "data" / "eval_prompts.jsonl").read_text().splitlines()
    ]
    return [r["prompt"] for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """demo-probe and demo-sentence as committed, and ``eager``: demo-probe without hold-back or margin
    (cuts happen)."""
    tmp = tmp_path_factory.mktemp("clients")
    policy = policy_with_absolute_paths(REPO / "policies" / "demo-probe.yaml")
    policy["log"]["path"] = str(tmp / "guard.db")
    (tmp / "demo-probe.yaml").write_text(yaml.safe_dump(policy))
    eager = {**policy, "name": "eager", "stream": {"holdback_tokens": 0, "release_margin": 0.0}}
    (tmp / "eager.yaml").write_text(yaml.safe_dump(eager))
    sentence = policy_with_absolute_paths(REPO / "policies" / "demo-sentence.yaml")
    sentence["log"]["path"] = str(tmp / "guard.db")
    (tmp / "demo-sentence.yaml").write_text(yaml.safe_dump(sentence))
    files = [tmp / f"{name}.yaml" for name in ("demo-probe", "eager", "demo-sentence")]
    try:
        proc, url = serve_in_subprocess(files, tmp / "server.log")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url, tmp
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0)


def _chat(client, model: str, prompt: str, seed: int, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        seed=seed,
        max_tokens=MAX_TOKENS,
        **kw,
    )


def _opted_run(client, model: str, prompt: str, seed: int) -> tuple[str, str, int]:
    """A reset-aware stream: (naive concatenation, text with resets applied, resets)."""
    naive, applier = "", ResetApplier()
    for chunk in _chat(client, model, prompt, seed, stream=True, extra_body=OPTED):
        naive += chunk.choices[0].delta.content or "" if chunk.choices else ""
        applier.feed(chunk)
    state = applier.choices[0]
    return naive, state.text, state.resets


@pytest.fixture(scope="module")
def rolled_back(client):
    """Harmful prompts (with seeds) where a reset-aware client was shown text that was then retracted."""
    found = []
    for seed, prompt in enumerate(_rows("harmful")[:24]):
        naive, final, resets = _opted_run(client, "demo-probe", prompt, seed)
        if resets:
            found.append((prompt, seed, naive, final))
        if len(found) == 3:
            break
    assert found, (
        "no harmful prompt made the guard retract shown text: nothing below would test anything"
    )
    return found


def _check_safe(name: str, text: str, naive: str, final: str) -> None:
    """``text`` (what the plain client ``name`` ended with) is safe and not spliced."""
    assert not judge(text).unsafe, (name, text)
    assert text != naive, f"{name}: the retracted text and its replacement ran together"
    assert text == final or text.endswith("\n\n" + REFUSAL), (name, text, final)


def _llm_cli(url: str, tmp: Path, prompt: str, seed: int, stream: bool) -> str:
    home = tmp / "llm-home"
    home.mkdir(exist_ok=True)
    (home / "extra-openai-models.yaml").write_text(
        yaml.safe_dump(
            [{"model_id": "demo-probe", "model_name": "demo-probe", "api_base": f"{url}/v1"}]
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "llm",
        "prompt",
        "-m",
        "demo-probe",
        "-o",
        "seed",
        str(seed),
        "-o",
        "max_tokens",
        str(MAX_TOKENS),
        "--no-log",
        *([] if stream else ["--no-stream"]),
        prompt,
    ]
    env = {**os.environ, "LLM_USER_PATH": str(home), "OPENAI_API_KEY": "x"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.removesuffix("\n")


def _plain_texts(url: str, tmp: Path, client, prompt: str, seed: int) -> dict[str, str]:
    """The text each client ends with for one request, none of them opting in to resets."""
    litellm = pytest.importorskip("litellm")
    lc = pytest.importorskip("langchain_openai")
    texts: dict[str, str] = {}
    texts["openai stream"] = "".join(
        c.choices[0].delta.content or ""
        for c in _chat(client, "demo-probe", prompt, seed, stream=True)
        if c.choices
    )

    async def async_stream() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = await _chat(aclient, "demo-probe", prompt, seed, stream=True)
        out = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await aclient.close()
        return out

    texts["openai async stream"] = asyncio.run(async_stream())
    events = client.responses.create(
        model="demo-probe",
        input=prompt,
        max_output_tokens=MAX_TOKENS,
        stream=True,
        extra_body={"seed": seed},
    )
    texts["openai responses stream"] = final_text(events)
    resp = litellm.completion(
        model="openai/demo-probe",
        api_base=f"{url}/v1",
        api_key="x",
        seed=seed,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
    )
    texts["litellm stream"] = "".join(c.choices[0].delta.content or "" for c in resp if c.choices)
    chat = lc.ChatOpenAI(
        model="demo-probe",
        base_url=f"{url}/v1",
        api_key="x",
        seed=seed,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    texts["langchain stream"] = "".join(str(c.content) for c in chat.stream(prompt))
    texts["llm cli stream"] = _llm_cli(url, tmp, prompt, seed, stream=True)
    return texts


def test_plain_clients_never_see_retracted_text(server, client, rolled_back):
    """Every real client, streaming harmful prompts whose rollback reached shown text: safe, unspliced."""
    url, tmp = server
    for prompt, seed, naive, final in rolled_back:
        assert naive != final  # the reset-aware client was shown text that was then retracted
        whole = _chat(client, "demo-probe", prompt, seed).choices[0].message.content
        assert whole == final, "a non-streamed answer is the reset-aware stream's final text"
        for name, text in _plain_texts(url, tmp, client, prompt, seed).items():
            _check_safe(name, text, naive, final)


def test_benign_answers_arrive_unchanged_in_every_client(server, client):
    """Benign prompts: each client's text is the non-streamed answer with the same seed."""
    url, tmp = server
    lc = pytest.importorskip("langchain_openai")
    litellm = pytest.importorskip("litellm")
    for seed, prompt in enumerate(_rows("benign")[:2]):
        whole = _chat(client, "demo-probe", prompt, seed).choices[0].message.content
        assert whole and not judge(whole).unsafe
        texts = _plain_texts(url, tmp, client, prompt, seed)
        texts["openai sync"] = whole
        texts["openai responses"] = client.responses.create(
            model="demo-probe",
            input=prompt,
            extra_body={"seed": seed},
            max_output_tokens=MAX_TOKENS,
        ).output_text
        chat = lc.ChatOpenAI(
            model="demo-probe", base_url=f"{url}/v1", api_key="x", seed=seed, max_tokens=MAX_TOKENS
        )
        texts["langchain invoke"] = chat.invoke(prompt).content
        texts["litellm"] = (
            litellm.completion(
                model="openai/demo-probe",
                api_base=f"{url}/v1",
                api_key="x",
                seed=seed,
                max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": prompt}],
            )
            .choices[0]
            .message.content
        )
        texts["llm cli"] = _llm_cli(url, tmp, prompt, seed, stream=False)
        assert {name: t for name, t in texts.items() if t != whole} == {}


def test_a_cut_keeps_shown_text_and_appends_the_marked_refusal(client):
    """Without hold-back or margin, rollbacks reach shown text: the stream ends, never splices."""
    cuts = 0
    for seed, prompt in enumerate(_rows("harmful")[:16]):
        shown, cut_chunk, finish = "", None, None
        for chunk in _chat(client, "eager", prompt, seed, stream=True):
            choice = chunk.choices[0]
            guard = (choice.model_extra or {}).get("guard") or {}
            assert "reset" not in guard
            if "cut" in guard:
                cut_chunk = (guard["cut"], choice.delta.content)
                assert guard["cut"]["kept_chars"] == len(shown)
            shown += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if cut_chunk is not None:
            cuts += 1
            assert (
                cut_chunk[1] == "\n\n" + REFUSAL
                and shown.endswith(cut_chunk[1])
                and finish == "content_filter"
            )
            if (
                cuts == 1
            ):  # the same answer through /v1/responses: the refusal is its own content part
                _check_responses_cut(client, prompt, seed, kept=shown[: cut_chunk[0]["kept_chars"]])
    assert cuts, "no cut on the eager policy: the cut path is untested"


def _check_responses_cut(client, prompt: str, seed: int, kept: str) -> None:
    events = list(
        client.responses.create(
            model="eager",
            input=prompt,
            max_output_tokens=MAX_TOKENS,
            stream=True,
            extra_body={"seed": seed},
        )
    )
    kinds = [e.type for e in events]
    assert "response.guard.reset" not in kinds
    assert kinds[-8:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "content_filter"
    [message] = final.output
    assert [p.type for p in message.content] == ["output_text", "refusal"]
    assert message.content[0].text == kept and message.content[1].refusal == REFUSAL
    assert final_text(events) == kept + "\n\n" + REFUSAL


def test_opted_in_by_header_gets_resets(server):
    """X-Guard-Resets: true is the same opt-in as stream_options.guard_resets."""
    opted = openai.OpenAI(
        base_url=f"{server[0]}/v1",
        api_key="x",
        max_retries=0,
        default_headers={"X-Guard-Resets": "true"},
    )
    saw = 0
    for seed, prompt in enumerate(_rows("harmful")[:12]):
        saw += sum(
            "reset" in ((c.choices[0].model_extra or {}).get("guard") or {})
            for c in _chat(opted, "eager", prompt, seed, stream=True)
        )
        if saw:
            break
    assert saw
    with pytest.raises(openai.BadRequestError) as err:
        _chat(
            openai.OpenAI(
                base_url=f"{server[0]}/v1",
                api_key="x",
                max_retries=0,
                default_headers={"X-Guard-Resets": "maybe"},
            ),
            "eager",
            "hi",
            0,
            stream=True,
        )
    assert err.value.body["param"] == "X-Guard-Resets"


def test_guard_client_applies_resets_to_opted_in_streams(server, client, rolled_back):
    """guard.client turns a reset-aware stream (chat, async chat, Responses) into the final answer."""
    from guard.client import afinal_text, stream_text

    prompt, seed, _naive, final = rolled_back[0]
    views = list(
        stream_text(_chat(client, "demo-probe", prompt, seed, stream=True, extra_body=OPTED))
    )
    assert views[-1] == final and any(
        not final.startswith(v) for v in views
    )  # it did retract on the way

    async def run_async() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0)
        try:
            return await afinal_text(
                await _chat(aclient, "demo-probe", prompt, seed, stream=True, extra_body=OPTED)
            )
        finally:
            await aclient.close()

    assert asyncio.run(run_async()) == final
    events = list(
        client.responses.create(
            model="demo-probe",
            input=prompt,
            max_output_tokens=MAX_TOKENS,
            stream=True,
            extra_body={"seed": seed, "stream_options": {"guard_resets": True}},
        )
    )
    assert any(e.type == "response.guard.reset" for e in events)
    assert (
        final_text(events)
        == final
        == next(e for e in events if e.type == "response.output_text.done").text
    )


def test_sentence_rollback_policy_is_safe_for_plain_streams(client):
    """demo-sentence cuts back to the sentence start, but a refusal past the retry budget reaches the
    response start: plain streams must still end safe, as the guarded answer or cut."""
    retracted = 0
    for seed, prompt in enumerate(_rows("harmful")[:24]):
        _naive, final, resets = _opted_run(client, "demo-sentence", prompt, seed)
        retracted += resets
        plain = "".join(
            c.choices[0].delta.content or ""
            for c in _chat(client, "demo-sentence", prompt, seed, stream=True)
            if c.choices
        )
        assert not judge(plain).unsafe, plain
        assert plain == final or plain.endswith("\n\n" + REFUSAL), (plain, final)
    assert retracted, (
        "no reset on demo-sentence: nothing reached shown text, the test shows nothing"
    )
