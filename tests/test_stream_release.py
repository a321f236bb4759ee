"""Streams for clients that do not apply resets (``retracting=False``): settled release, and a cut
instead of a reset; on the real controller with a random-weight model."""

from __future__ import annotations

from guard.controller.backtrack import BoundMonitor
from guard.controller.events import Cut, Finished, Reset, TextDelta
from guard.controller.release import keep_released, near_miss, release_limit
from guard.monitors.base import AggregationSpec, Monitor
from tests.test_controller import run


class ScriptedScores(Monitor):
    """Scores output position ``i`` with ``scores.get(token id at i, 0)`` (reads layer 1: one-step lag)."""

    def __init__(self, scores: dict[int, float], name: str = "s") -> None:
        self.name, self.layer, self.threshold = name, 1, 0.5
        self.aggregation = AggregationSpec("none")
        self.scores = scores

    def score(self, hidden, token_ids):
        return [self.scores.get(t, 0.0) for t in token_ids]


def _run(engine, monitors, retracting: bool, **cfg):
    events, record, _ = run(engine, monitors, retracting=retracting, **cfg)
    return events, record


def _shown(events) -> str:
    """What a client that ignores resets displays: every text it was sent, appended."""
    return "".join(e.text for e in events if isinstance(e, (TextDelta, Cut)))


def test_rollback_response_resamples_after_what_a_plain_client_was_shown(tiny_engine):
    """``rollback: response`` for a client that cannot retract: the response start it can still be
    given is the end of the text it was shown (settled under the release margin), so a firing after
    that text is resampled there, not ended with a Cut; an opted client is reset to the start."""
    clean, _ = _run(tiny_engine, [], retracting=True)
    ids = [t for e in clean if isinstance(e, TextDelta) for t in e.token_ids]
    fire = next(i for i in range(12, len(ids)) if ids[i] not in ids[:i])
    mon = ScriptedScores({ids[fire]: 1.0})
    cfg = {"holdback_tokens": 0, "rollback": "response", "release_margin": 0.0}
    opted, orec = _run(tiny_engine, [mon], retracting=True, garble_margin=None, **cfg)
    assert orec.spans[0].start == 0 and any(isinstance(e, Reset) for e in opted)
    events, rec = _run(tiny_engine, [mon], retracting=False, garble_margin=None, **cfg)
    assert not any(isinstance(e, (Reset, Cut)) for e in events)
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.outcome == "recovered"
    span = rec.spans[0]
    assert span.fired_at == fire and 0 < span.start <= fire  # kept what was shown, resampled after
    shown_before = sum(
        len(e.token_ids) for e in events[: events.index(fin)] if isinstance(e, TextDelta)
    )
    assert shown_before >= span.start
    assert _shown(events) == fin.text == rec.final_text
    assert rec.final_text.startswith(tiny_engine.tokenizer.decode(ids[: span.start]))


def test_a_monitor_that_condemns_shown_text_cuts_a_plain_client(tiny_engine):
    """The model's own reset token withdraws all it wrote: a plain client that was shown some of
    it gets a Cut and the refusal, not a continuation after it (``condemns_shown``), while the
    same firing from an ordinary monitor is resampled after the shown text (test above)."""
    clean, _ = _run(tiny_engine, [], retracting=True)
    ids = [t for e in clean if isinstance(e, TextDelta) for t in e.token_ids]
    fire = next(i for i in range(12, len(ids)) if ids[i] not in ids[:i])
    mon = BoundMonitor(ScriptedScores({ids[fire]: 1.0}), rollback="response", condemns_shown=True)
    cfg = {"holdback_tokens": 0, "rollback": "auto", "release_margin": 0.0, "refusal": "No."}
    events, rec = _run(tiny_engine, [mon], retracting=False, garble_margin=None, **cfg)
    assert rec.spans[0].start == 0 and rec.spans[0].fired_at == fire
    [cut] = [e for e in events if isinstance(e, Cut)]
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.outcome == "refused"
    assert fin.finish_reason == "content_filter" and cut.refusal == "No."
    opted, orec = _run(tiny_engine, [mon], retracting=True, garble_margin=None, **cfg)
    assert orec.spans[0].start == 0 and any(isinstance(e, Reset) for e in opted)
    assert not any(isinstance(e, Cut) for e in opted)


def test_rollback_response_cuts_when_the_firing_is_inside_shown_text(tiny_engine):
    """A firing inside the text a plain client was shown (here the from-scratch re-check, at the
    threshold tightened by the first firing) still reaches it: the answer ends with a Cut."""
    clean, _ = _run(tiny_engine, [], retracting=True)
    ids = [t for e in clean if isinstance(e, TextDelta) for t in e.token_ids]
    fire = next(i for i in range(12, len(ids)) if ids[i] not in ids[:i])
    inside = next(i for i in range(2, fire) if ids[i] not in ids[:i] and ids[i] != ids[fire])
    # 0.45: released (below the 0.5 threshold, margin 0), condemned once it is 0.8 * 0.5 = 0.4.
    mon = ScriptedScores({ids[inside]: 0.45, ids[fire]: 1.0})
    events, rec = _run(
        tiny_engine,
        [mon],
        retracting=False,
        holdback_tokens=0,
        rollback="response",
        release_margin=0.0,
        garble_margin=None,
        refusal="No.",
    )
    assert not any(isinstance(e, Reset) for e in events)
    assert rec.spans[0].fired_at == fire and rec.spans[0].start > inside
    assert any(
        span.fired_at == inside for span in rec.spans[1:]
    )  # the re-check fired in shown text
    [cut] = [e for e in events if isinstance(e, Cut)]
    fin = events[-1]
    assert (
        isinstance(fin, Finished)
        and fin.finish_reason == "content_filter"
        and fin.outcome == "refused"
    )
    kept = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert cut.kept_chars == len(kept) > 0 and cut.refusal == "No." and cut.monitor == "s"
    assert _shown(events) == fin.text == rec.final_text == kept + "\n\nNo."
    assert events.index(cut) == len(events) - 2  # nothing after the cut but the end


def test_a_near_miss_holds_back_what_a_firing_there_would_cut(tiny_engine):
    clean, _ = _run(tiny_engine, [], retracting=True)
    ids = [t for e in clean if isinstance(e, TextDelta) for t in e.token_ids]
    near = ScriptedScores({ids[12]: 0.4})  # below the 0.5 threshold: it never fires
    events, _ = _run(
        tiny_engine,
        [near],
        retracting=False,
        holdback_tokens=0,
        rollback="response",
        release_margin=0.5,
    )
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert isinstance(events[-1], Finished) and events[-1].outcome == "clean" and len(deltas) >= 2
    # Released while streaming: only tokens before the near miss at 12 (it stops the release); the rest
    # arrives with the end of the answer (the last delta).
    streamed = sum(len(e.token_ids) for e in deltas[:-1])
    assert 0 < streamed <= 12 and len(ids) > 13
    opted, _ = _run(
        tiny_engine,
        [near],
        retracting=False,
        holdback_tokens=0,
        rollback="response",
        release_margin=0.0,
    )
    assert sum(isinstance(e, TextDelta) for e in opted) > sum(
        isinstance(e, TextDelta) for e in events
    )
    assert _shown(opted) == _shown(events) == events[-1].text  # same answer, only released later


def test_release_limit_contract():
    mon = ScriptedScores({})
    state = mon.new_state()
    state.extend(0, [0.0, 0.1, 0.3, 0.0, 0.0, 0.0])
    assert release_limit(scored=6, sent=0, holdback_tokens=2, margin=None, watched=[state]) == 4
    assert (
        near_miss(state, 0, 0.5) == 2 and near_miss(state, 3, 0.5) is None
    )  # 0.3 >= 0.5 * (1 - 0.5)
    assert (
        release_limit(scored=6, sent=1, holdback_tokens=2, margin=0.5, watched=[state]) == 1
    )  # stalled
    assert (
        release_limit(scored=6, sent=3, holdback_tokens=2, margin=0.5, watched=[state]) == 4
    )  # shown already
    assert (
        release_limit(scored=6, sent=0, holdback_tokens=2, margin=0.1, watched=[state]) == 4
    )  # 0.3 < 0.45


def test_an_earlier_near_miss_is_not_forgotten_after_a_later_one(tiny_engine):
    """Two near misses: the release stops at the first, whatever the rollback rule (a firing may end
    in a refusal past the retry budget, which reaches back to the response start)."""
    clean, _ = _run(tiny_engine, [], retracting=True)
    ids = [t for e in clean if isinstance(e, TextDelta) for t in e.token_ids]
    near = ScriptedScores(
        {ids[5]: 0.4, ids[20]: 0.4}
    )  # never fires (threshold 0.5), near at 5 and 20
    events, _ = _run(
        tiny_engine,
        [near],
        retracting=False,
        holdback_tokens=0,
        rollback="tokens",
        rollback_tokens=2,
        release_margin=0.5,
    )
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert sum(len(e.token_ids) for e in deltas[:-1]) <= 5


def test_rollback_auto_keeps_what_a_plain_client_was_shown_after_the_threshold_tightens(
    tiny_engine,
):
    """Text released to a plain client settled under the threshold of its time; after a firing the
    threshold tightens (retry_threshold) and ``rollback: auto`` would doubt that text. For a client
    that cannot retract, the rollback point is clamped to the released tokens (no needless Cut); a
    reset-aware client still gets the full rollback."""
    clean, _ = _run(tiny_engine, [], retracting=True)
    ids = [t for e in clean if isinstance(e, TextDelta) for t in e.token_ids]
    fire = next(i for i in range(8, len(ids)) if ids[i] not in ids[:i])
    # 0.21: released before the firing (below 0.5 * (1 - 0.5)), doubted after it (>= 0.5 * 0.8 * 0.5);
    # any other token fires once the threshold is 0.4, so the resample is cut back again.
    table = {
        **dict.fromkeys(range(tiny_engine.info.vocab_size), 0.45),
        **dict.fromkeys(ids[:fire], 0.21),
        ids[fire]: 0.9,
    }
    cfg = {"holdback_tokens": 0, "rollback": "auto", "garble_margin": None, "max_retries": 3}
    events, rec = _run(tiny_engine, [ScriptedScores(table)], retracting=False, **cfg)
    shown = sum(
        len(e.token_ids) for e in events if isinstance(e, TextDelta) and e is not events[-2]
    )
    assert rec.spans[0].start == rec.spans[0].fired_at == fire and len(rec.spans) >= 2
    assert 0 < rec.spans[1].start <= rec.spans[1].fired_at  # kept what was shown, not cut to 0
    cuts = [e for e in events if isinstance(e, Cut)]
    assert (
        not cuts or len(rec.spans) == cfg["max_retries"] + 1
    )  # a Cut only once the budget is spent
    assert shown >= rec.spans[1].start
    opted, orec = _run(tiny_engine, [ScriptedScores(table)], retracting=True, **cfg)
    assert orec.spans[1].start == 0 and any(isinstance(e, Reset) for e in opted)


def test_keep_released_contract():
    assert keep_released(0, 10, 6) == 6  # doubted released text is kept
    assert keep_released(8, 10, 6) == 8  # a later point is left alone
    assert (
        keep_released(2, 4, 6) == 2
    )  # a firing inside released text: the rollback reaches it anyway
    assert keep_released(0, 6, 6) == 6  # never past the fired token
