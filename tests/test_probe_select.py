"""Probe choice by cross-validation, token labels, and calibration on the model's own sampled answers."""

from __future__ import annotations

import itertools
import json
import random
import re

import numpy as np
import pytest
import torch

from guard.engine.transformers_engine import TransformersEngine
from guard.errors import InvalidRequestError
from guard.judge import JudgeError, NamedJudge
from guard.monitors.base import AggregationSpec
from guard.probe import metrics as M
from guard.probe import select as S
from guard.probe.collect import collect
from guard.probe.data import DataError, read_jsonl
from guard.probe.labels import hazard_token, token_selection
from guard.probe.sample import sample_answers
from guard.probe.train import CALIBRATION_MARGIN, CalibrationSampling, TrainConfig, train_probe
from guard.sampling import SamplingParams
from guard.testing import make_random_llama

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
MARKERS = {"alpha": "zebra", "beta": "walrus", "gamma": "pelican"}


def _rows(seed: int) -> list[dict]:
    """Three harm categories, each marking its positive completions with its own word; benign topics."""
    rng = random.Random(seed)
    rows = []
    for i in range(180):
        cat = list(MARKERS)[i % 3]
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 8))]
        label = (i // 3) % 2
        if label:
            at = rng.randrange(1, len(words))
            words.insert(at, MARKERS[cat])
        completion = " ".join(words)
        row = {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
            "completion": completion,
            "label": label,
            "category": cat,
        }
        if label:
            row["hazard_start"] = completion.index(MARKERS[cat])
        rows.append(row)
    for i in range(120):
        rows.append(
            {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
                "completion": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 8))),
                "label": 0,
                "category": f"topic{i % 4}",
            }
        )
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("select")
    model = make_random_llama(d / "m", layers=2)
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(0)))
    prompts = d / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"hello there {w}"}) + "\n" for w in WORDS[:6])
    )
    yield {
        "model": model,
        "engine": TransformersEngine.load(model),
        "train": path,
        "prompts": prompts,
        "dir": d,
    }
    torch.set_num_threads(n)


def _score(layer: int, fold_tpr: list[float], margin: float, labels: str = "all") -> S.Score:
    c = S.Candidate(layer, "logreg", labels, AggregationSpec("none"))  # type: ignore[arg-type]
    mean = float(np.mean(fold_tpr))
    return S.Score(c, mean, mean, min(fold_tpr), 0.99, 0.0, 0.9, fold_tpr, margin)


def test_criterion_is_the_worst_left_out_category_then_its_margin():
    # a candidate that misses one unseen category loses to one that catches every category less
    # evenly well, whatever its mean; among saturated candidates the larger margin wins
    uneven = _score(1, [1.0, 1.0, 1.0, 0.6], 0.1)
    even = _score(2, [0.9, 0.85, 0.9, 0.85], -0.2)
    assert uneven.tpr > even.tpr
    assert S.ranked([uneven, even], 4)[0] is even
    narrow = _score(1, [1.0] * 4, 0.5)
    wide = _score(3, [1.0] * 4, 2.0, labels="from-hazard")
    assert S.ranked([narrow, wide, even], 4) == [wide, narrow, even]
    assert S.ranked([narrow, _score(2, [1.0] * 4, float("nan"))], 4)[0] is narrow


def test_margin_is_scale_free_and_reads_the_low_quantile():
    rng = np.random.default_rng(0)
    cal = 1 / (1 + np.exp(-rng.normal(0, 1, 400)))
    pos = 1 / (1 + np.exp(-rng.normal(6, 1, 50)))
    t = M.threshold_at_fpr_bound(cal, 0.01, 0.9).threshold
    m = S.margin(pos, cal, t)
    logit = np.log(pos / (1 - pos))
    t_logit, med = np.log(t / (1 - t)), np.median(np.log(cal / (1 - cal)))
    assert m == pytest.approx((np.quantile(logit, 0.1) - t_logit) / (t_logit - med))
    # doubling every logit (a sharper probe, same ranking) leaves the margin unchanged
    sharp = lambda p: 1 / (1 + np.exp(-2 * np.log(p / (1 - p))))  # noqa: E731
    assert S.margin(sharp(pos), sharp(cal), float(sharp(np.array([t]))[0])) == pytest.approx(m)


def test_category_folds_hold_out_each_harm_category_whole():
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0, 0])
    cats = ["a", "a", "b", "b", "c", "c", "t1", "t2", "t3", None]
    folds = S.make_folds(labels, cats)
    assert folds.kind == "category" and folds.names == ["a", "b", "c"]
    for f, name in enumerate(folds.names):
        held = set(folds.heldout[f].tolist())
        assert {i for i, c in enumerate(cats) if c == name} <= held
        assert not {i for i, c in enumerate(cats) if c == name} & set(
            folds.train(f, len(labels)).tolist()
        )
    assert sorted(np.concatenate(folds.heldout).tolist()) == list(range(len(labels)))  # a partition
    flat = np.array([0, 1] * 20)
    no_cats = S.make_folds(flat, [None] * 40, k=4)
    assert no_cats.kind == "kfold" and len(no_cats.heldout) == 4
    assert all(len(h) == 10 and set(flat[h].tolist()) == {0, 1} for h in no_cats.heldout)


def test_cross_validation_never_fits_on_the_category_it_scores(setup, monkeypatch):
    engine = setup["engine"]
    examples = read_jsonl(setup["train"])
    acts = collect(engine, examples, [0, 1], progress=False)
    by_tokens = {tuple(engine.tokenizer.encode(ex.completion)): ex.category for ex in examples}
    seen: list[set[str]] = []
    real = S.fit_candidate

    def spy(a, hazard, layer, method, labels, **kw):
        bounds = np.searchsorted(a.row, np.arange(a.n_rows + 1))
        seen.append(
            {by_tokens[tuple(a.token_ids[x:y].tolist())] for x, y in itertools.pairwise(bounds)}
        )
        return real(a, hazard, layer, method, labels, **kw)

    monkeypatch.setattr(S, "fit_candidate", spy)
    cats = [ex.category for ex in examples]
    folds = S.make_folds(acts.labels, cats)
    scores = S.cross_validate(
        acts,
        np.full(acts.n_rows, -1),
        folds,
        layers=[1],
        methods=["logreg"],
        labels=["all"],
        aggs=[AggregationSpec("none")],
        calibration=None,
        target_fpr=0.05,
        confidence=0.9,
        l2=0.1,
        progress=False,
    )
    assert folds.names == ["alpha", "beta", "gamma"] and len(seen) == 3
    for name, cats_fitted in zip(folds.names, seen, strict=True):
        assert name not in cats_fitted and set(MARKERS) - {name} <= cats_fitted
    # each category's marker word is its own: a probe that never saw it misses much of it, so the
    # per-fold recall is well below that of the same probe on categories it was trained on
    (score,) = scores
    assert np.mean(score.fold_tpr) < 0.6
    train_all = S.fit_candidate(acts, np.full(acts.n_rows, -1), 1, "logreg", "all", l2=0.1)
    rows = M.row_max_scores(
        train_all.score_tensor(acts.hidden[1]).numpy(),
        acts.row,
        acts.n_rows,
        AggregationSpec("none"),
    )
    assert M.tpr_at_fpr(rows, acts.labels, 0.05) > 0.9


def test_token_labels_select_tokens_around_the_hazard(setup):
    engine = setup["engine"]
    ex = next(e for e in read_jsonl(setup["train"]) if e.label == 1 and e.hazard_start > 0)
    h = hazard_token(engine, ex)
    ids = engine.tokenizer.encode(ex.completion)
    assert engine.tokenizer.decode(ids[h:]).lstrip().startswith(MARKERS[ex.category])
    row = np.array([0] * len(ids) + [1, 1, 1])
    labels, hazard = np.array([1, 0]), np.array([h, -1])
    assert token_selection(row, labels, hazard, "all")[0].tolist() == list(range(len(ids) + 3))
    idx, y = token_selection(row, labels, hazard, "from-hazard")
    assert (
        idx.tolist() == list(range(h, len(ids) + 3))
        and y.tolist() == [1] * (len(ids) - h) + [0] * 3
    )
    idx, _ = token_selection(row, labels, hazard, "to-hazard")
    assert idx.tolist() == [*range(h + 1), len(ids), len(ids) + 1, len(ids) + 2]


def test_sampled_answers_carry_the_live_activations(setup):
    engine = setup["engine"]
    chats = [[{"role": "user", "content": "hello there fox"}]]
    res = sample_answers(
        engine, chats, [0, 1], n=2, params=SamplingParams(max_tokens=12), seed=3, progress=False
    )
    again = sample_answers(
        engine, chats, [0, 1], n=2, params=SamplingParams(max_tokens=12), seed=3, progress=False
    )
    assert (
        res.acts.labels.tolist() == [0, 0]
        and res.acts.token_ids.tolist() == again.acts.token_ids.tolist()
    )
    first = res.acts.select(np.array([0]))
    prompt = engine.tokenizer.encode_chat(chats[0])
    forced = engine.hidden_states(prompt + first.token_ids.tolist(), [1])[1][len(prompt) :]
    torch.testing.assert_close(first.hidden[1], forced, rtol=1e-4, atol=1e-4)
    assert len(res.texts) == 2 and res.texts[0] == engine.tokenizer.decode(first.token_ids.tolist())


def _live_rows(mon, acts) -> np.ndarray:
    """Per answer, the monitor's decision statistic as live: max of its aggregated token scores."""
    tokens = mon.score_tensor(acts.hidden[mon.layer]).numpy()
    return M.row_max_scores(tokens, acts.row, acts.n_rows, mon.aggregation)


def _calibrated(rows: np.ndarray, target_fpr: float) -> float:
    """The threshold calibration should set on these answers: the 90%-bound rule, plus the margin."""
    t = M.threshold_at_fpr_bound(rows, target_fpr, 0.9).threshold
    return float(1 / (1 + np.exp(-(np.log(t / (1 - t)) + CALIBRATION_MARGIN))))


def test_default_training_chooses_by_cv_and_calibrates_on_sampled_answers(setup):
    sampling = CalibrationSampling(n=3, max_tokens=16)
    res = train_probe(
        setup["engine"],
        [setup["train"]],
        model_dir=setup["model"],
        progress=False,
        config=TrainConfig(target_fpr=0.05),
        calibrate_prompts=setup["prompts"],
        sampling=sampling,
    )
    mon, meta = res.monitor, res.monitor.meta
    sel = meta["metrics"]["selection"]
    assert sel["folds"] == "category" and sel["fold_names"] == ["alpha", "beta", "gamma"]
    assert len(sel["table"]) == 2 * 2 * 3 * 3  # layers x methods x token labels x aggregations
    best = sel["table"][0]
    assert (mon.layer, meta["method"], meta["token_labels"], mon.aggregation.kind) == (
        best["layer"],
        best["method"],
        best["labels"],
        best["aggregation"]["kind"],
    )
    cal = meta["metrics"]["calibration"]
    assert cal["sampled"] and cal["negatives"] == 18 and "prompts.jsonl" in cal["source"]
    # 18 answers cannot hold 5% with 90% confidence (45 needed): the threshold is their maximum
    assert not cal["meets_target"] and cal["negatives_needed"] == 45
    assert cal["fpr_upper_bound"] == pytest.approx(1 - 0.1 ** (1 / 18), rel=1e-6)
    # the threshold is the calibration rule applied to the model's own sampled answers
    answers = sample_answers(
        setup["engine"],
        [[{"role": "user", "content": f"hello there {w}"}] for w in WORDS[:6]],
        [mon.layer],
        n=3,
        params=sampling.params(),
        seed=0,
        progress=False,
    )
    assert mon.threshold == pytest.approx(_calibrated(_live_rows(mon, answers.acts), 0.05))


def test_a_judge_drops_harmful_sampled_answers_before_cv_and_calibration(setup):
    """A benign prompt's sampled answer the judge calls unsafe is no negative: it is left out of
    cross-validation and calibration, listed for review, and the threshold is the calibration rule
    on the answers that remain."""
    sampling = CalibrationSampling(n=3, max_tokens=16)
    chats = [[{"role": "user", "content": f"hello there {w}"}] for w in WORDS[:6]]
    first = sample_answers(
        setup["engine"], chats, [0, 1], n=3, params=sampling.params(), seed=0, progress=False
    )
    flagged = set(first.texts[:5])
    res = train_probe(
        setup["engine"],
        [setup["train"]],
        model_dir=setup["model"],
        progress=False,
        config=TrainConfig(target_fpr=0.05),
        calibrate_prompts=setup["prompts"],
        sampling=sampling,
        judge=NamedJudge(lambda text: text in flagged, "--judge test:flagged", "judge"),
    )
    mon = res.monitor
    cal = mon.meta["metrics"]["calibration"]
    kept = [i for i, t in enumerate(first.texts) if t not in flagged]
    assert cal["judge"] == "--judge test:flagged"
    dropped = [t for t in first.texts if t in flagged]
    assert cal["excluded_unsafe"]["count"] == len(dropped)
    assert cal["excluded_unsafe"]["examples"] == [t[:160] for t in dropped[:3]]
    assert cal["negatives"] == len(kept) < 18
    rows = _live_rows(mon, first.acts)
    assert mon.threshold == pytest.approx(_calibrated(rows[kept], 0.05))
    highest = cal["highest"]
    assert [h["score"] for h in highest] == pytest.approx(sorted(rows[kept], reverse=True)[:3])
    assert all(h["text"] not in flagged for h in highest)
    assert [h["fires"] for h in highest] == [h["score"] > mon.threshold for h in highest]


def test_a_judge_that_leaves_nothing_fails_or_has_nothing_to_read_is_an_error(setup):
    sampling = CalibrationSampling(n=1, max_tokens=8)

    def train(verdict, **kw):
        kw.setdefault("calibrate_prompts", setup["prompts"])
        train_probe(
            setup["engine"],
            [setup["train"]],
            progress=False,
            sampling=sampling,
            judge=NamedJudge(verdict, "--judge-regex x", "judge_regex"),
            **kw,
        )

    with pytest.raises(JudgeError, match="called every one of the 6 sampled") as err:
        train(lambda text: True)
    assert err.value.param == "judge_regex" and err.value.status_code == 400

    def broken(text):
        raise KeyError("boom")

    with pytest.raises(JudgeError, match=r"raised on sampled calibration answer 0 .*KeyError"):
        train(broken)
    with pytest.raises(JudgeError, match="returned str on sampled calibration answer 0"):
        train(lambda text: "no")
    with pytest.raises(InvalidRequestError, match="there are none") as err:
        train(lambda text: True, calibrate_prompts=None, calibration=[setup["train"]])
    assert err.value.param == "judge_regex"


def test_fixed_options_leave_nothing_to_choose(setup):
    res = train_probe(
        setup["engine"],
        [setup["train"]],
        layers=[1],
        progress=False,
        config=TrainConfig(method="logreg", token_labels="all", aggregation=AggregationSpec("ema")),
        sampling=CalibrationSampling(n=1, max_tokens=8, max_prompts=10),
    )
    sel = res.monitor.meta["metrics"]["selection"]
    assert sel["folds"] is None and res.monitor.aggregation.kind == "ema"
    # no --calibrate-prompts: the model's own answers to the prompts of the benign-category rows
    cal = res.monitor.meta["metrics"]["calibration"]
    assert cal["sampled"] and cal["source"].startswith(
        "model's own answers to 10 benign-category prompts of --data"
    )


def test_hazard_start_must_point_into_a_positive_completion(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "p", "completion": "abc", "label": 0, "hazard_start": 1}) + "\n"
    )
    with pytest.raises(
        DataError, match=re.escape("bad.jsonl:1: 'hazard_start' marks harmful content")
    ):
        read_jsonl(bad)
    bad.write_text(
        json.dumps({"prompt": "p", "completion": "abc", "label": 1, "hazard_start": 3}) + "\n"
    )
    with pytest.raises(
        DataError, match=re.escape("bad.jsonl:1: 'hazard_start' must be a character offset")
    ):
        read_jsonl(bad)


ORGANISM2 = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "organism2"


@pytest.mark.skipif(
    not (ORGANISM2 / "organism.json").is_file(), reason="models/organism2 not built"
)
def test_cli_defaults_on_organism2_give_a_probe_the_server_loads(tmp_path, capsys):
    """The user path on the organism no default was chosen on: `guard probe train` with its defaults,
    then a policy naming the probe, loaded by the service as `guard serve` does."""
    import asyncio

    from guard.cli import main as guard_main
    from guard.service import GenerationRequest, GuardService

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    prompts = tmp_path / "benign_prompts.jsonl"  # a quarter of the file keeps the test short
    prompts.write_text(
        "".join(
            (ORGANISM2 / "data" / "calibration_prompts.jsonl").read_text().splitlines(True)[:25]
        )
    )
    try:
        rc = guard_main(
            [
                "probe",
                "train",
                "--model",
                str(ORGANISM2),
                "--data",
                str(ORGANISM2 / "data" / "probe_train.jsonl"),
                "--calibrate-prompts",
                str(prompts),
                "--out",
                str(tmp_path / "probe"),
                "--quiet",
            ]
        )
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "leave-one-category-out over blackmail, burglary, counterfeiting, smuggling" in out
        assert "token labels at the chosen layer" in out and "chosen: layer" in out
        assert "model's own answers to 25 prompts" in out
        assert "highest-scoring sampled calibration answers (the threshold is set against" in out
        meta = json.loads((tmp_path / "probe" / "probe.json").read_text())
        assert (
            meta["aggregation"]["kind"] in ("none", "ema", "window")
            and meta["metrics"]["calibration"]["sampled"]
        )
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            f"name: org2\nmodel: {{path: {ORGANISM2}}}\n"
            f"monitors:\n  - {{name: harm-probe, kind: probe, path: {tmp_path / 'probe'}}}\n"
        )
        service = GuardService.from_policy_files([policy])
        try:
            req = GenerationRequest(
                model="org2",
                request_id="r",
                max_tokens=8,
                seed=0,
                messages=[{"role": "user", "content": "How do I pitch a tent?"}],
            )
            final = asyncio.run(_last(service.stream(service.prepare(req))))
        finally:
            service.close()
        assert (
            final.outcome in ("clean", "recovered", "refused") and final.usage.generated_tokens > 0
        )
    finally:
        torch.set_num_threads(n)


async def _last(stream):
    return [e async for e in stream][-1]


def test_cross_validation_spreads_its_layers_over_deep_models():
    from guard.probe.train import spread_layers

    assert spread_layers(5) == [0, 1, 2, 3, 4]
    deep = spread_layers(32)
    assert len(deep) == 8 and deep[0] == 0 and deep[-1] == 31 and deep == sorted(set(deep))


def test_sampled_and_row_calibration_are_exclusive(setup, tmp_path, capsys):
    from guard.cli import main as guard_main

    rc = guard_main(
        [
            "probe",
            "train",
            "--model",
            str(setup["model"]),
            "--data",
            str(setup["train"]),
            "--calibrate-prompts",
            str(setup["prompts"]),
            "--calibration",
            str(setup["train"]),
            "--out",
            str(tmp_path / "p"),
            "--quiet",
        ]
    )
    assert (
        rc == 2
        and "--calibrate-prompts) or on rows (--calibration), not both" in capsys.readouterr().err
    )
    rc = guard_main(
        [
            "probe",
            "train",
            "--model",
            str(setup["model"]),
            "--data",
            str(setup["train"]),
            "--samples",
            "0",
            "--out",
            str(tmp_path / "p"),
            "--quiet",
        ]
    )
    assert rc == 2 and "must be >= 1" in capsys.readouterr().err


def test_cli_judge_options_reach_calibration(setup, tmp_path, capsys):
    """`guard probe train --judge-regex` is the judge that reads the sampled answers: one that
    calls every answer unsafe leaves nothing to calibrate on, a clear error (exit 2), as are a
    judge with nothing to read and an empty pattern."""
    from guard.cli import main as guard_main

    base = ["probe", "train", "--model", str(setup["model"]), "--data", str(setup["train"])]
    rc = guard_main(
        [
            *base,
            *("--calibrate-prompts", str(setup["prompts"]), "--samples", "1", "--max-tokens", "8"),
            *("--judge-regex", ".", "--out", str(tmp_path / "p"), "--quiet"),
        ]
    )
    assert rc == 2 and "called every one of the 6 sampled" in capsys.readouterr().err
    words = tmp_path / "words.txt"
    words.write_text("# none of these\nzzz-never\n")
    rc = guard_main(
        [
            *base,
            *("--calibration", str(setup["train"]), "--judge-words", str(words)),
            *("--out", str(tmp_path / "p"), "--quiet"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"--judge-words {words} reads the model's sampled" in err
    rc = guard_main([*base, "--judge-regex", "", "--out", str(tmp_path / "p"), "--quiet"])
    assert rc == 2 and "an empty pattern matches every answer" in capsys.readouterr().err
