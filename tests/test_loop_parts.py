"""The parts of the review loop on their own: exporting labelled records as training rows, reading
them back, reviewed rows in training, probes compared side by side, and promotion into a policy file."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest
import torch

from guard.cli import main as guard_main
from guard.controller.backtrack import BoundMonitor, GuardedGeneration
from guard.controller.record import DiscardedSpan, Firing, GenerationRecord, RetryStrategy
from guard.errors import PolicyError
from guard.logstore import LogStore
from guard.loop import export_labelled, promote_probe, write_jsonl
from guard.monitors.base import AggregationSpec, Monitor
from guard.monitors.probe import ProbeMonitor
from guard.policy import load_policy
from guard.policy.build import default_controller_config
from guard.probe.collect import prompt_ids, token_ids
from guard.probe.data import read_jsonl
from guard.probe.train import TrainConfig, train_probe
from guard.sampling import SamplingParams
from tests.conftest import generation_record

CHAT = [{"role": "user", "content": "hi"}]


def record(**kw) -> GenerationRecord:
    base = dict(
        request_id="r",
        policy_name="p",
        policy_hash="h",
        model="m",
        messages=CHAT,
        prompt=None,
        prompt_tokens=3,
        output_ids=[7, 8, 9],
        final_text="fine answer",
        outcome="clean",
        finish_reason="length",
    )
    rec = GenerationRecord(**{**base, **kw})
    rec.monitors_fired = list(
        dict.fromkeys(f.monitor for f in rec.firings)
    )  # as the controller keeps it
    return rec


def span(
    attempt: int, start: int, ids: list[int], text: str, monitor: str = "harm"
) -> DiscardedSpan:
    return DiscardedSpan(
        attempt=attempt,
        start=start,
        token_ids=ids,
        text=text,
        tokens=[],
        scores={},
        aggregated={},
        monitor=monitor,
        threshold=0.5,
        fired_at=start,
        fired_token_id=ids[0],
        fired_token="",
        retracted_chars=0,
    )


def firing(
    monitor: str, position: int, attempt: int, action: str = "backtrack", scope: str = "output"
) -> Firing:
    return Firing(
        monitor=monitor,
        action=action,
        scope=scope,
        position=position,
        token_id=1,
        token="",
        score=0.9,
        threshold=0.5,
        attempt=attempt,
    )


def store_of(tmp_path: Path, *entries) -> tuple[LogStore, list[str]]:
    """A store holding ``(record, [labels...])`` entries, written in order (oldest first)."""
    store = LogStore(tmp_path / "g.db")
    ids = []
    for i, (rec, labels) in enumerate(entries):
        rec.created = 1000.0 + i
        ids.append(store.write(rec))
        for label in labels:
            store.label(ids[-1], label, reviewer=f"rev-{label}", note=f"note {i}")
    return store, ids


# -- export ----------------------------------------------------------------------------------------


def test_verdicts_label_what_the_monitor_flagged(tmp_path):
    two_spans = record(
        spans=[span(0, 0, [1, 2], "bad one"), span(1, 0, [3], "bad two")],
        firings=[firing("harm", 1, 0), firing("harm", 0, 1)],
        outcome="recovered",
    )
    wrong = record(
        spans=[span(0, 0, [4, 5], "benign text")],
        firings=[firing("harm", 1, 0)],
        outcome="recovered",
    )
    store, ids = store_of(
        tmp_path,
        (two_spans, ["true_positive"]),
        (wrong, ["false_positive"]),
        (record(spans=[span(0, 0, [1], "x")], firings=[firing("harm", 0, 0)]), ["unsure"]),
        (record(spans=[span(0, 0, [1], "y")], firings=[firing("harm", 0, 0)]), []),
        (
            record(spans=[span(0, 0, [6], "relabelled")], firings=[firing("harm", 0, 0)]),
            ["true_positive", "false_positive"],
        ),
    )
    rows = export_labelled(store)
    assert [(r["log_id"], r["completion"], r["label"], r["kind"], r["attempt"]) for r in rows] == [
        (ids[0], "bad one", 1, "span", 0),
        (ids[0], "bad two", 1, "span", 1),
        (ids[1], "benign text", 0, "span", 0),  # the recovered final answer was not flagged: no row
        (ids[4], "relabelled", 0, "span", 0),
    ]  # the latest label counts
    assert (
        rows[3]["reviewer"] == "rev-false_positive" and rows[3]["review_label"] == "false_positive"
    )
    assert all(r["prompt"] == "hi" and "messages" not in r and "context" not in r for r in rows)
    assert {(r["source"], r["split"], r["category"], r["monitor"]) for r in rows} == {
        ("review", "reviewed", "reviewed", "harm")
    }
    assert (
        export_labelled(store, policy="other") == []
        and len(export_labelled(store, since=1004.0)) == 1
    )


def test_shadow_firings_flag_the_answer_and_the_monitor_filter_picks_rows(tmp_path):
    rec = record(
        spans=[span(0, 0, [1, 2], "cut text")],
        outcome="recovered",
        output_ids=[5, 6],
        finish_reason="stop",
        firings=[
            firing("trial", 0, 0, "shadow"),
            firing("harm", 1, 0),
            firing("trial", 1, 1, "shadow"),
        ],
        retries=[
            RetryStrategy(retry=1, seed=1, temperature=1.0, top_p=1.0, banned_first_tokens=[1])
        ],
    )
    on_stop = record(
        output_ids=[5, 6], finish_reason="stop", firings=[firing("trial", 2, 0, "shadow")]
    )
    store, ids = store_of(tmp_path, (rec, ["false_positive"]), (on_stop, ["false_positive"]))
    trial = export_labelled(store, monitor="trial")
    # the trial monitor fired inside the span another monitor cut, in the final answer, and on a stop token
    assert [(r["log_id"], r["kind"], r["completion"], r["monitor"]) for r in trial] == [
        (ids[0], "span", "cut text", "trial"),
        (ids[0], "answer", "fine answer", "trial"),
        (ids[1], "answer", "fine answer", "trial"),
    ]
    harm = export_labelled(store, monitor="harm")
    assert [(r["kind"], r["monitor"]) for r in harm] == [("span", "harm")]
    assert next((r["kind"], r["monitor"]) for r in export_labelled(store)) == (
        "span",
        "harm",
    )  # the cutting monitor


def test_rows_reproduce_the_conversation(tmp_path, caplog):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    flagged = dict(
        spans=[span(0, 0, [1], "flagged")], firings=[firing("harm", 0, 0)], outcome="recovered"
    )
    store, ids = store_of(
        tmp_path,
        (record(messages=chat, **flagged), ["true_positive"]),
        (record(messages=None, prompt="raw text", **flagged), ["true_positive"]),
        (record(messages=None, prompt=None, **flagged), ["true_positive"]),  # token-id prompt
        (
            record(
                deliberation="on_risk", reasoning="<|think|>Rule 1 applies.<|/think|>", **flagged
            ),
            ["true_positive"],
        ),
        (
            record(deliberation="retry", reasoning="<|think|>later<|/think|>", **flagged),
            ["true_positive"],
        ),
    )
    with caplog.at_level(logging.WARNING, logger="guard.loop"):
        rows = {r["log_id"]: r for r in export_labelled(store)}
    assert rows[ids[0]]["prompt"] == "second" and rows[ids[0]]["messages"] == chat
    assert rows[ids[1]]["prompt"] == "raw text" and rows[ids[1]]["raw_prompt"] is True
    assert rows[ids[3]]["context"] == "<|think|>Rule 1 applies.<|/think|>"
    assert ids[2] not in rows and ids[4] not in rows
    assert "token ids" in caplog.text and "reasoning opened mid-generation" in caplog.text

    write_jsonl(rows.values(), tmp_path / "rows.jsonl")
    ex = read_jsonl(tmp_path / "rows.jsonl")
    assert all(e.reviewed for e in ex)
    assert ex[0].chat() == chat and (ex[1].raw_prompt, ex[1].messages) == (True, None)
    assert ex[2].context == "<|think|>Rule 1 applies.<|/think|>" and ex[2].chat() == CHAT


def test_prompt_scope_rows_are_separate(tmp_path):
    rec = record(
        firings=[firing("risk", 2, 0, "shadow", scope="prompt"), firing("harm", 0, 0, "shadow")]
    )
    store, _ids = store_of(tmp_path, (rec, ["true_positive"]))
    prompt_rows = export_labelled(store, scope="prompt")
    assert [(r["kind"], r["monitor"], r["completion"]) for r in prompt_rows] == [
        ("prompt", "risk", "fine answer")
    ]
    assert [(r["kind"], r["monitor"]) for r in export_labelled(store)] == [("answer", "harm")]


class TokenMonitor(Monitor):
    """Fires on one token id (no activations)."""

    def __init__(self, token: int):
        self.name, self.layer, self.threshold, self.token = "tok", None, 0.5, token
        self.aggregation = AggregationSpec("none")

    def score(self, hidden, token_ids):
        return [float(t == self.token) for t in token_ids]


def _generate(engine, monitors, **cfg) -> GenerationRecord:
    chat = [{"role": "user", "content": "Tell me something."}]
    prompt = engine.tokenizer.encode_chat(chat)
    rec = generation_record(messages=chat, prompt=None, prompt_tokens=len(prompt))
    gen = GuardedGeneration(
        engine,
        prompt,
        SamplingParams(seed=3, max_tokens=24),
        monitors,
        default_controller_config(**cfg),
        rec,
        lambda e: None,
    )
    while not gen.advance():
        pass
    gen.close()
    return rec


def test_a_mid_answer_rollback_exports_the_kept_answer_as_context(tiny_engine, tmp_path, caplog):
    clean = _generate(tiny_engine, [])
    target = clean.output_ids[8]
    rec = _generate(
        tiny_engine,
        [BoundMonitor(TokenMonitor(target))],
        rollback="tokens",
        rollback_tokens=3,
        max_retries=4,
    )
    first = rec.spans[0]
    assert first.start > 0, "the rollback must keep part of the answer"
    store, _ids = store_of(tmp_path, (rec, ["false_positive"]))
    rows = export_labelled(store, tokenizer=tiny_engine.tokenizer)
    assert len(rows) == len(rec.spans)
    # Until the firing, the guarded attempt sampled exactly what the unguarded one did.
    assert first.token_ids == clean.output_ids[first.start : first.start + len(first.token_ids)]
    assert rows[0]["context"] == tiny_engine.tokenizer.decode(clean.output_ids[: first.start])
    assert rows[0]["completion"] == first.text
    with caplog.at_level(logging.WARNING, logger="guard.loop"):
        assert export_labelled(store) == []  # no tokenizer to decode the kept answer with
    assert "no tokenizer" in caplog.text

    write_jsonl(rows, tmp_path / "rows.jsonl")
    ex = read_jsonl(tmp_path / "rows.jsonl")[0]
    _, n_before = token_ids(tiny_engine, ex)
    assert prompt_ids(tiny_engine, ex) == tiny_engine.tokenizer.encode_chat(rec.messages)
    assert n_before == len(prompt_ids(tiny_engine, ex)) + len(
        tiny_engine.tokenizer.encode(ex.context)
    )


# -- training with reviewed rows --------------------------------------------------------------------

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "there",
    "how",
    "are",
    "you",
    "today",
    "fine",
    "thank",
]


def _rows(n: int, seed: int, **extra) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 9))]
        if i % 2:
            words.insert(rng.randrange(len(words)), "zebra")
        out.append(
            {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
                "completion": " ".join(words),
                "label": i % 2,
                **extra,
            }
        )
    return out


def test_reviewed_rows_are_trained_on_and_their_negatives_calibrate(
    tiny_engine, tiny_model_dir, tmp_path
):
    torch.set_num_threads(1)
    original = tmp_path / "orig.jsonl"
    write_jsonl(_rows(40, 1), original)
    write_jsonl(_rows(10, 2, source="review"), tmp_path / "rev.jsonl")
    write_jsonl([r | {"label": 0} for r in _rows(20, 3)], tmp_path / "cal.jsonl")
    res = train_probe(
        tiny_engine,
        [original, tmp_path / "rev.jsonl"],
        model_dir=tiny_model_dir,
        layers=[1],
        calibration=[tmp_path / "cal.jsonl"],
        config=TrainConfig(heldout_frac=0.25),
        progress=False,
    )
    t, cal = res.monitor.meta["training"], res.monitor.meta["metrics"]["calibration"]
    assert (t["rows"], t["reviewed_rows"], t["heldout_rows"], t["train_rows"]) == (
        50,
        10,
        10,
        40,
    )  # 25% of 40
    assert cal["negatives"] == 20 + 5 and cal["source"][-1] == "5 reviewed negatives of --data"


# -- comparing probes ------------------------------------------------------------------------------


def _probe(d: int, layer: int, seed: int, threshold: float = 0.5) -> ProbeMonitor:
    g = torch.Generator().manual_seed(seed)
    return ProbeMonitor(
        "p",
        layer,
        torch.randn(d, generator=g),
        0.0,
        threshold=threshold,
        aggregation=AggregationSpec("none"),
    )


def test_eval_compares_probes_side_by_side(tiny_engine, tiny_model_dir, tmp_path, capsys):
    d = tiny_engine.info.d_model
    _probe(d, 0, 1, threshold=0.0).save(tmp_path / "always")  # fires on every row
    _probe(d, 1, 2, threshold=1.0).save(tmp_path / "never")  # fires on none
    write_jsonl(_rows(12, 4), tmp_path / "data.jsonl")
    assert (
        guard_main(
            [
                "probe",
                "eval",
                "--probe",
                str(tmp_path / "always"),
                "--probe",
                str(tmp_path / "never"),
                "--model",
                str(tiny_model_dir),
                "--data",
                str(tmp_path / "data.jsonl"),
                "--quiet",
                "--no-cache",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "12 rows (6 pos / 6 neg)" in out
    assert [
        s.split()[-2:] for s in out.splitlines() if s.lstrip().startswith("positives caught")
    ] == [["6/6", "0/6"]]
    assert [
        s.split()[-2:] for s in out.splitlines() if s.lstrip().startswith("false positives")
    ] == [["6/6", "0/6"]]
    assert (
        guard_main(
            [
                "probe",
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(tmp_path / "data.jsonl"),
            ]
        )
        == 2
    )


# -- promotion ---------------------------------------------------------------------------------------

POLICY = """\
# top comment
name: p   # trailing comment
model: {{path: {model}}}
monitors:
  - {{name: flow, kind: probe, path: old-probe}}    # flow style
  - name: block
    kind: probe
    path: old-probe   # block style
    threshold: 0.25
    action: shadow
  - {{name: reset, kind: reset_token}}
log: {{path: g.db}}
"""


@pytest.fixture
def policy_dir(tmp_path, tiny_engine, tiny_model_dir):
    d = tiny_engine.info.d_model
    _probe(d, 1, 1, threshold=0.3).save(tmp_path / "old-probe")
    _probe(d, 1, 2, threshold=0.7).save(tmp_path / "new-probe")
    _probe(d, 0, 3).save(tmp_path / "layer0-probe")
    (tmp_path / "p.yaml").write_text(POLICY.format(model=tiny_model_dir))
    return tmp_path


def test_promote_edits_only_the_monitors_values(policy_dir):
    path = policy_dir / "p.yaml"
    os.chmod(path, 0o640)
    before = path.read_text()
    done = promote_probe(policy_dir / "new-probe", path, "flow")
    assert (done.path, done.threshold, done.effective_threshold) == ("new-probe", None, 0.7)
    assert path.read_text() == before.replace("path: old-probe}", "path: new-probe}")
    done = promote_probe(policy_dir / "new-probe", path, "block", action="backtrack")
    assert (done.threshold, done.action) == (0.7, "backtrack")
    expected = (
        before.replace("path: old-probe}", "path: new-probe}")
        .replace("path: old-probe   # block", "path: new-probe   # block")
        .replace("threshold: 0.25", "threshold: 0.7")
        .replace("action: shadow", "action: backtrack")
    )
    assert path.read_text() == expected
    done = promote_probe(policy_dir / "new-probe", path, "flow", threshold=0.9, action="shadow")
    flow = "- {name: flow, kind: probe, path: new-probe, threshold: 0.9, action: shadow}    # flow style"
    assert flow in path.read_text()
    policy = load_policy(path)
    assert (policy.monitor("flow").threshold, policy.monitor("flow").action) == (0.9, "shadow")
    assert done.policy_hash == policy.content_hash  # what /health shows once a server reloads it
    assert oct(path.stat().st_mode & 0o777) == "0o640" and not list(policy_dir.glob(".p.yaml*"))


def test_promote_refuses_a_result_that_would_not_load_and_leaves_the_file(policy_dir, capsys):
    path = policy_dir / "p.yaml"
    text = path.read_text().replace(
        "path: old-probe   # block style", "path: old-probe\n    layer: 1"
    )
    path.write_text(text)
    with pytest.raises(PolicyError, match="trained on layer 0; the policy asks for layer 1"):
        promote_probe(policy_dir / "layer0-probe", path, "block")
    with pytest.raises(PolicyError, match="no monitor named 'nope'"):
        promote_probe(policy_dir / "new-probe", path, "nope")
    with pytest.raises(PolicyError, match="not a probe monitor"):
        promote_probe(policy_dir / "new-probe", path, "reset")
    assert path.read_text() == text and not list(policy_dir.glob(".p.yaml*"))
    assert (
        guard_main(
            [
                "probe",
                "promote",
                str(policy_dir / "layer0-probe"),
                "--policy",
                str(path),
                "--monitor",
                "block",
            ]
        )
        == 2
    )
    assert "layer 0" in capsys.readouterr().err
    assert (
        guard_main(
            [
                "probe",
                "promote",
                str(policy_dir / "new-probe"),
                "--policy",
                str(path),
                "--monitor",
                "block",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "monitor block -> probe new-probe, threshold 0.7 (pinned in the policy), action shadow"
        in out
    )
