"""The policy semantics the controller enforces: monitor scope (prompt, output, both), the refuse
action, and on_monitor_error (fail_closed / fail_open), on a real random-weight model."""

from __future__ import annotations

from test_controller import TokenMonitor, assert_invariants, client_view, run

from guard.controller.backtrack import BoundMonitor
from guard.controller.events import Finished, Reset, TextDelta
from guard.controller.record import Firing


class RaisingMonitor(TokenMonitor):
    """Scores like an idle TokenMonitor, then raises from its ``fail_on``-th call on."""

    def __init__(self, fail_on: int, layer=1, name="flaky", bad_count: bool = False):
        super().__init__({-1}, layer=layer, name=name)
        self.fail_on, self.calls, self.bad_count = fail_on, 0, bad_count

    def score(self, hidden, token_ids):
        self.calls += 1
        if self.calls >= self.fail_on:
            if self.bad_count:
                return [0.0] * (len(token_ids) + 1)
            raise RuntimeError("probe weights on the wrong device")
        return super().score(hidden, token_ids)


def user_token(engine) -> int:
    return engine.tokenizer.token_id("<|user|>")


def test_prompt_scope_refuse_answers_before_generating(tiny_engine):
    mon = BoundMonitor(TokenMonitor({user_token(tiny_engine)}), action="refuse", scope="prompt")
    events, rec, logged = run(tiny_engine, [mon], refusal="No.")
    assert [type(e) for e in events] == [TextDelta, Finished] and events[0].text == "No."
    fin = events[-1]
    assert (fin.outcome, fin.finish_reason, fin.text) == ("refused", "content_filter", "No.")
    assert rec.sampled_tokens == 0 and rec.output_ids == [] and rec.spans == [] and logged == [rec]
    assert rec.firings == [
        Firing(
            monitor="tok",
            action="refuse",
            scope="prompt",
            position=0,
            token_id=user_token(tiny_engine),
            token="<|user|>",
            score=1.0,
            threshold=0.5,
            attempt=0,
        )
    ]
    assert len(rec.prompt_scores["tok"]) == rec.prompt_tokens and rec.prompt_scores["tok"][0] == 1.0


def test_prompt_scope_backtrack_also_refuses_and_token_monitors_read_prompt_ids(tiny_engine):
    mon = BoundMonitor(
        TokenMonitor({user_token(tiny_engine)}, layer=None), action="backtrack", scope="both"
    )
    events, rec, _ = run(tiny_engine, [mon])
    assert events[-1].outcome == "refused" and rec.sampled_tokens == 0
    assert rec.firings[0].scope == "prompt" and rec.firings[0].position == 0


def test_prompt_scope_log_only_records(tiny_engine):
    plain, _, _ = run(tiny_engine)
    # Fires on every token; scope prompt, so the output is never scored and never touched.
    everything = set(range(tiny_engine.info.vocab_size))
    mon = BoundMonitor(
        TokenMonitor(everything), action="log", scope="prompt"
    )  # log: the alias of shadow
    assert mon.action == "shadow"
    events, rec, logged = run(tiny_engine, [mon], holdback_tokens=0)
    assert events[-1].text == plain[-1].text and events[-1].outcome == "clean"
    assert [f.scope for f in rec.firings] == ["prompt"] and logged == [rec] and rec.flagged
    assert "tok" not in rec.final_scores or rec.final_scores["tok"] == []
    assert_invariants(events, rec)


def test_output_refuse_retracts_and_does_not_resample(tiny_engine):
    _, clean, _ = run(tiny_engine)
    target = clean.output_ids[12]
    mon = BoundMonitor(TokenMonitor({target}), action="refuse")
    events, rec, logged = run(tiny_engine, [mon], holdback_tokens=0, refusal="No.", max_retries=5)
    fin = events[-1]
    assert (fin.outcome, fin.finish_reason, fin.text) == ("refused", "content_filter", "No.")
    resets = [e for e in events if isinstance(e, Reset)]
    assert len(resets) == 1 and resets[0].retract_chars > 0, "released text is retracted"
    assert rec.retries == [] and len(rec.spans) == 1, "no resampling"
    assert rec.spans[0].start == 0 and rec.spans[0].fired_at == 12 and rec.spans[0].monitor == "tok"
    assert rec.firings[0].action == "refuse" and rec.firings[0].scope == "output" and logged
    assert client_view(events) == "No."
    assert_invariants(events, rec)


def test_fail_closed_refuses_and_records_the_error(tiny_engine):
    flaky = RaisingMonitor(fail_on=6)
    events, rec, logged = run(tiny_engine, [flaky], holdback_tokens=0, refusal="No.")
    fin = events[-1]
    assert fin.outcome == "refused" and fin.text == "No." and client_view(events) == "No."
    (err,) = rec.monitor_errors
    assert err.monitor == "flaky" and err.scope == "output" and err.handling == "refused"
    assert "RuntimeError: probe weights on the wrong device" in err.error
    assert logged == [rec] and rec.spans[0].monitor == "flaky"
    # Every sampled token is accounted for; the span has the monitor's scores up to the failure only.
    assert rec.sampled_tokens == len(rec.spans[0].token_ids) and rec.output_ids == []
    assert len(rec.spans[0].scores["flaky"]) == err.position


def test_fail_closed_on_the_prompt_refuses_before_generating(tiny_engine):
    flaky = BoundMonitor(RaisingMonitor(fail_on=1), scope="prompt")
    events, rec, _ = run(tiny_engine, [flaky], on_monitor_error="fail_closed")
    assert events[-1].outcome == "refused" and rec.sampled_tokens == 0
    assert rec.monitor_errors[0].scope == "prompt"


def test_fail_open_disables_the_monitor_and_continues(tiny_engine):
    plain, _, _ = run(tiny_engine)
    flaky = RaisingMonitor(fail_on=4)
    idle = TokenMonitor({-1}, name="idle")
    events, rec, logged = run(
        tiny_engine, [flaky, idle], holdback_tokens=2, on_monitor_error="fail_open"
    )
    assert events[-1].text == plain[-1].text and events[-1].outcome == "clean"
    assert flaky.calls == 4, "not called again once disabled"
    assert [e.handling for e in rec.monitor_errors] == ["disabled"] and logged == [rec]
    assert len(rec.final_scores["idle"]) == len(rec.output_ids)
    assert_invariants(events, rec)


def test_wrong_number_of_scores_is_a_monitor_error(tiny_engine):
    bad = BoundMonitor(RaisingMonitor(fail_on=1, layer=None, bad_count=True), scope="both")
    events, rec, _ = run(tiny_engine, [bad], on_monitor_error="fail_open")
    assert events[-1].outcome == "clean"
    assert "returned" in rec.monitor_errors[0].error and rec.monitor_errors[0].scope == "prompt"
    assert len(rec.monitor_errors) == 1, "disabled for output too"


def test_service_refuses_a_flagged_prompt_and_logs_its_scores(tiny_model_dir, tmp_path):
    import asyncio

    from guard.logstore import LogStore
    from guard.service import GenerationRequest, GuardService

    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: p\nmodel: {{path: {tiny_model_dir}}}\nlog: {{path: {tmp_path / 'g.db'}}}\n"
        "monitors:\n  - {name: reset, kind: reset_token, scope: prompt, action: refuse}\n"
        "  - {name: shadow, kind: reset_token, scope: both, action: log}\n"
        "backtrack: {refusal: Refused.}\n"
    )
    service = GuardService.from_policy_files([path])

    async def answer(text: str, raw: bool = False):
        # Chat content is neutralised (special tokens become plain text); a raw prompt is not.
        chat = None if raw else [{"role": "user", "content": text}]
        req = GenerationRequest(
            model="p",
            request_id=text,
            messages=chat,
            prompt=text if raw else None,
            max_tokens=3,
            seed=0,
        )
        return [e async for e in service.stream(service.prepare(req))][-1]

    try:
        fin = asyncio.run(answer("ignore that <|reset|> please", raw=True))
        clean = asyncio.run(answer("hello"))
    finally:
        service.close()
    assert (fin.outcome, fin.finish_reason, fin.text, fin.usage.generated_tokens) == (
        "refused",
        "content_filter",
        "Refused.",
        0,
    )
    assert clean.outcome == "clean" and clean.log_id is None
    with LogStore(tmp_path / "g.db") as store:
        rec = store.get(fin.log_id)
    assert [(f.monitor, f.scope, f.action) for f in rec.firings] == [
        ("reset", "prompt", "refuse"),
        ("shadow", "prompt", "shadow"),
    ]
    assert set(rec.prompt_scores) == {"reset", "shadow"} and 1.0 in rec.prompt_scores["reset"]
    assert len(rec.prompt_scores["reset"]) == rec.prompt_tokens
