"""The backtracking controller on a real (random-weight) model: hold-back, resets, retries,
refusal, stop conditions, and the record's invariants."""

from __future__ import annotations

import pytest
import torch

from guard.controller.backtrack import BoundMonitor, GuardedGeneration
from guard.controller.events import Finished, Reset, TextDelta
from guard.controller.record import Steer
from guard.monitors.base import AggregationSpec, Monitor
from guard.policy.build import default_controller_config, default_strategy
from guard.sampling import SamplingParams
from tests.conftest import generation_record


class TokenMonitor(Monitor):
    """Fires on given token ids; reads a layer (so it has the one-step lag) unless ``layer=None``."""

    def __init__(self, ids, layer=1, name="tok", direction=None):
        self.name, self.layer, self.threshold = name, layer, 0.5
        self.aggregation = AggregationSpec("none")
        self.ids, self.direction = set(ids), direction

    def score(self, hidden, token_ids):
        if self.layer is not None:
            assert hidden.shape[0] == len(token_ids)
        return [1.0 if t in self.ids else 0.0 for t in token_ids]

    def steering_vector(self):
        return self.direction


def run(
    engine,
    monitors=(),
    seed=3,
    max_tokens=30,
    stop=(),
    *,
    prompt_text="Tell me something.",
    config=None,
    retracting=True,
    **cfg,
):
    """One guarded generation to its end: ``(events, record, logged records)``. ``monitors`` are
    monitors or :class:`BoundMonitor` s; ``config`` (a ControllerConfig) replaces the schema's
    defaults with ``cfg`` overrides; ``retracting=False`` is a client that does not apply resets."""
    assert config is None or not cfg, "give either a config or overrides of the default one"
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": prompt_text}])
    record = generation_record(prompt=prompt_text, prompt_tokens=len(prompt))
    events, logged = [], []
    gen = GuardedGeneration(
        engine,
        prompt,
        SamplingParams(seed=seed, max_tokens=max_tokens, stop=stop),
        [m if isinstance(m, BoundMonitor) else BoundMonitor(m) for m in monitors],
        config if config is not None else default_controller_config(**cfg),
        record,
        events.append,
        on_finish=lambda r: logged.append(r) or "log-1",
        retracting=retracting,
    )
    while not gen.advance():
        pass
    gen.close()
    return events, record, logged


def client_view(events) -> str:
    """What a streaming client displays after applying deltas and resets."""
    text = ""
    for ev in events:
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, Reset):
            assert ev.retract_chars <= len(text)
            text = text[: len(text) - ev.retract_chars]
    return text


def assert_invariants(events, record):
    fin = events[-1]
    assert isinstance(fin, Finished) and sum(isinstance(e, Finished) for e in events) == 1
    assert client_view(events) == fin.text == record.final_text
    sampled = len(record.output_ids) + sum(len(s.token_ids) for s in record.spans)
    # the token that ended the generation (EOS) is sampled but not part of the answer
    assert record.sampled_tokens - sampled in (0, 1)
    for span in record.spans:
        assert span.fired_at >= span.start
        for scores in span.scores.values():
            assert len(scores) in (len(span.token_ids), len(span.token_ids) - 1)


def test_clean_generation_is_unchanged_by_an_idle_monitor(tiny_engine):
    plain, _rec0, _logged0 = run(tiny_engine)
    guarded, rec1, _ = run(tiny_engine, [TokenMonitor({-1})], holdback_tokens=4)
    assert plain[-1].text == guarded[-1].text and guarded[-1].outcome == "clean"
    assert rec1.final_scores["tok"] == [0.0] * len(rec1.output_ids)
    assert_invariants(guarded, rec1)


def test_rollback_inside_the_holdback_window_is_invisible(tiny_engine):
    _, clean, _ = run(tiny_engine)
    target = clean.output_ids[10]
    events, rec, logged = run(
        tiny_engine,
        [TokenMonitor({target})],
        holdback_tokens=64,
        rollback="tokens",
        rollback_tokens=2,
        max_retries=5,
    )
    assert not any(isinstance(e, Reset) for e in events)
    assert rec.spans and rec.spans[0].fired_token_id == target and rec.spans[0].fired_at == 10
    assert rec.spans[0].start == 8 and rec.spans[0].retracted_chars == 0
    assert events[-1].outcome in ("recovered", "refused") and logged == [rec]
    assert rec.retries[0].banned_first_tokens == [clean.output_ids[8]]
    assert rec.output_ids[8:9] != [clean.output_ids[8]] or events[-1].outcome == "refused"
    assert_invariants(events, rec)


def test_rollback_past_released_text_emits_reset(tiny_engine):
    _, clean, _ = run(tiny_engine)
    target = clean.output_ids[12]
    events, rec, _ = run(
        tiny_engine, [TokenMonitor({target})], holdback_tokens=0, rollback="response", max_retries=5
    )
    resets = [e for e in events if isinstance(e, Reset)]
    assert resets and resets[0].monitor == "tok" and resets[0].retry == 1
    # at most tokens 0..11 were released (token 12 was unscored; partial UTF-8 may hold some back)
    assert 0 < resets[0].retract_tokens <= 12 and rec.spans[0].fired_at == 12
    assert resets[0].retract_chars == rec.spans[0].retracted_chars > 0
    assert_invariants(events, rec)


def test_exhausted_retries_end_in_the_policy_refusal(tiny_engine):
    vocab = set(range(tiny_engine.info.vocab_size))
    events, rec, logged = run(
        tiny_engine,
        [TokenMonitor(vocab)],
        holdback_tokens=0,
        max_retries=2,
        refusal="No.",
        reset_marker="[RESET]",
    )
    fin = events[-1]
    assert fin.outcome == "refused" and fin.finish_reason == "content_filter" and fin.text == "No."
    assert fin.resets == 3 and len(rec.retries) == 2 and logged
    assert all(e.marker == "[RESET]" for e in events if isinstance(e, Reset))
    assert_invariants(events, rec)


class EveryNth(TokenMonitor):
    """Fires on every ``n``-th token it scores (so firings land mid-answer, attempt after attempt)."""

    def __init__(self, n):
        super().__init__(set(), name="nth")
        self.n, self.calls = n, 0

    def score(self, hidden, token_ids):
        out = []
        for _ in token_ids:
            self.calls += 1
            out.append(1.0 if self.calls % self.n == 0 else 0.0)
        return out


def test_exhausted_retries_after_a_partial_rollback_keep_every_sampled_token_in_the_record(
    tiny_engine,
):
    """Past the budget the refusal replaces the whole answer, so the tokens kept by the last
    partial rollback are discarded too, in the final span."""
    events, rec, _ = run(
        tiny_engine,
        [EveryNth(6)],
        holdback_tokens=0,
        rollback="tokens",
        rollback_tokens=2,
        max_retries=1,
        refusal="No.",
    )
    assert events[-1].outcome == "refused" and rec.output_ids == []
    assert rec.spans[0].start > 0 and rec.spans[-1].start == 0
    assert_invariants(events, rec)


def test_token_monitor_fires_without_lag_and_shadow_monitors_change_nothing(tiny_engine):
    plain, clean, _ = run(tiny_engine)
    target = clean.output_ids[5]
    shadow = BoundMonitor(TokenMonitor({target}, layer=None, name="shadow"), action="shadow")
    events, rec, logged = run(tiny_engine, [shadow])
    assert events[-1].text == plain[-1].text and events[-1].outcome == "clean"
    assert rec.firings[0].monitor == "shadow" and rec.firings[0].position == 5
    assert rec.firings[0].action == "shadow" and logged


def test_steering_strategy_is_recorded(tiny_engine):
    _, clean, _ = run(tiny_engine)
    mon = TokenMonitor({clean.output_ids[6]}, direction=torch.ones(tiny_engine.info.d_model) / 8)
    events, rec, _ = run(
        tiny_engine, [mon], strategies=(default_strategy(temperature=0.5, steer_alpha=2.0),)
    )
    assert rec.retries[0].steer == Steer(monitor="tok", layer=1, alpha=2.0)
    assert rec.retries[0].temperature == 0.5
    assert_invariants(events, rec)


def test_stop_strings_and_length(tiny_engine):
    plain, _clean, _ = run(tiny_engine, max_tokens=20)
    assert plain[-1].finish_reason == "length" and plain[-1].usage.completion_tokens == 20
    text = plain[-1].text
    stop = text[5:8]
    events, rec, _ = run(
        tiny_engine, [TokenMonitor({-1})], max_tokens=20, stop=(stop,), holdback_tokens=0
    )
    assert events[-1].finish_reason == "stop" and events[-1].text == text[: text.find(stop)]
    assert stop not in client_view(events)
    assert_invariants(events, rec)


@pytest.mark.parametrize("holdback", [0, 3, 100])
def test_stream_reconstruction_for_any_holdback(tiny_engine, holdback):
    _, clean, _ = run(tiny_engine, seed=11)
    mon = TokenMonitor({clean.output_ids[4], clean.output_ids[15]})
    events, rec, _ = run(
        tiny_engine, [mon], seed=11, holdback_tokens=holdback, rollback="sentence", max_retries=4
    )
    assert_invariants(events, rec)


def test_the_engine_is_asked_for_surprisal_only_where_the_garble_check_can_read_it(tiny_engine):
    """Surprisal feeds only the garble check, which judges resamples after a firing: without any
    monitor, or with the check off, the sequence tells the engine not to compute it."""

    def wants(monitors, **cfg) -> bool:
        gen = GuardedGeneration(
            tiny_engine,
            tiny_engine.tokenizer.encode("x"),
            SamplingParams(seed=1, max_tokens=2),
            [BoundMonitor(m) for m in monitors],
            default_controller_config(**cfg),
            generation_record(prompt_tokens=1),
            lambda e: None,
        )
        gen.close()
        return gen.seq.surprisal

    assert wants([TokenMonitor({-1})]) is True
    assert wants([]) is False
    assert wants([TokenMonitor({-1})], garble_margin=None) is False
