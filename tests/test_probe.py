"""Probe training: metrics against hand-computed values, training on a tiny random Llama, the CLI."""

from __future__ import annotations

import json
import random
from itertools import product

import numpy as np
import pytest
import torch

from guard.cli import main as guard_main
from guard.engine.transformers_engine import TransformersEngine
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.probe.data import DataError, read_jsonl
from guard.probe.metrics import (
    auroc,
    fpr_upper_bound,
    negatives_needed,
    rates_at,
    row_max_scores,
    threshold_at_fpr,
    threshold_at_fpr_bound,
    tpr_at_fpr,
)
from guard.probe.train import TrainConfig, split_rows, train_probe
from guard.testing import make_random_llama

WORDS = [
    "hello",
    "there",
    "how",
    "are",
    "you",
    "today",
    "i",
    "am",
    "fine",
    "thank",
    "the",
    "quick",
    "brown",
    "dog",
    "lazy",
    "jumps",
    "over",
]
MARKER = "fox fox"


# -- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, labels, expected",
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # pos 0.35 beats 0.1, loses to 0.4
        ([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1], 0.875),  # one tie counts 1/2: (1.5 + 2) / 4
        ([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 1], 0.5),
    ],
)
def test_auroc_hand_computed(scores, labels, expected):
    assert auroc(scores, labels) == pytest.approx(expected)


def test_auroc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 200).astype(float), rng.integers(0, 2, 200)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p, n in product(pos, neg)])
    assert auroc(scores, labels) == pytest.approx(pairwise)
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))


def test_threshold_at_fpr_keeps_the_empirical_rate_at_or_below_target():
    neg = np.arange(100) / 100.0
    t = threshold_at_fpr(neg, 0.01)
    assert t == 0.98 and np.mean(neg > t) == 0.01
    assert np.mean(neg > threshold_at_fpr(neg, 0.05)) == 0.05
    assert threshold_at_fpr(neg[:50], 0.01) == 0.49  # fewer than 1/FPR negatives: their maximum
    assert threshold_at_fpr([0.5] * 10 + [0.9], 0.1) == 0.5  # ties: never above target
    scores, labels = [0.1, 0.2, 0.3, 0.25, 0.6], [0, 0, 0, 1, 1]
    assert tpr_at_fpr(scores, labels, 0.0) == 0.5
    assert rates_at(scores, labels, 0.2) == (1.0, 1 / 3)


def test_bounded_threshold_holds_the_target_with_its_confidence_where_the_quantile_does_not():
    """The contract of calibration: over many calibration samples, the threshold's true false-fire
    rate on new negatives exceeds the target at most ``1 - confidence`` of the time. Scores are
    uniform, so a threshold ``t``'s true rate is ``1 - t``."""
    rng = np.random.default_rng(0)
    target, n, trials = 0.01, 400, 2000
    bounded_misses = quantile_misses = 0
    for _ in range(trials):
        neg = rng.random(n)
        bt = threshold_at_fpr_bound(neg, target, 0.9)
        assert bt.meets_target and bt.fpr_bound <= target and bt.above == np.sum(neg > bt.threshold)
        bounded_misses += 1 - bt.threshold > target
        quantile_misses += 1 - threshold_at_fpr(neg, target) > target
    assert bounded_misses / trials <= 0.1 + 3 * np.sqrt(0.09 / trials)
    assert quantile_misses / trials > 0.5  # the empirical quantile misses more often than not
    # exact values: 400 negatives allow one above at 90% (bound 0.97%), none at 95% (0.75%)
    neg = np.arange(400) / 400
    assert threshold_at_fpr_bound(neg, target, 0.9).above == 1
    assert threshold_at_fpr_bound(neg, target, 0.95).above == 0
    assert fpr_upper_bound(0, 400, 0.95) == pytest.approx(1 - 0.05 ** (1 / 400))
    # too few negatives for any threshold: their maximum, and the bound says it misses
    few = threshold_at_fpr_bound(neg[:100], target, 0.9)
    assert few.threshold == neg[99] and not few.meets_target and few.fpr_bound > target
    assert negatives_needed(target, 0.9) == 230
    assert negatives_needed(0.0, 0.9) is None  # not 0: no number of negatives bounds a rate of 0


def test_row_max_uses_the_aggregated_score():
    tok = [0.0, 1.0, 0.0, 0.2, 0.2]
    row = np.array([0, 0, 0, 1, 1])
    ema = row_max_scores(tok, row, 2, AggregationSpec("ema", alpha=0.5))
    np.testing.assert_allclose(ema, [0.5, 0.2])
    np.testing.assert_allclose(row_max_scores(tok, row, 2, AggregationSpec("none")), [1.0, 0.2])


def test_split_rows_is_seeded_stratified_and_disjoint():
    labels = np.array([0] * 50 + [1] * 30)
    train, held = split_rows(labels, 0.2, seed=3)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 80
    assert (labels[held] == 1).sum() == 6 and (labels[held] == 0).sum() == 10
    np.testing.assert_array_equal(split_rows(labels, 0.2, seed=3)[1], held)
    assert not np.array_equal(split_rows(labels, 0.2, seed=4)[1], held)


# -- data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ("{bad json", "not valid JSON"),
        ('{"prompt": "a", "completion": "b", "label": 2}', "'label' must be 0 or 1"),
        ('{"prompt": "a", "completion": "b", "label": true}', "'label' must be 0 or 1"),
        ('{"prompt": "a", "label": 1}', "'completion' must be a string"),
        ('{"prompt": "a", "completion": "", "label": 1}', "'completion' is empty"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "label": 0}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"d.jsonl:3: {message}"):
        read_jsonl(path)


# -- training on a tiny random Llama ------------------------------------------------------------


def _rows(n: int, seed: int) -> list[dict]:
    """Label-1 completions contain the marker; everything else is drawn from the same words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 10))]
        if i % 2:
            words.insert(rng.randrange(len(words)), MARKER)
        rows.append(
            {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(5)),
                "completion": " ".join(words),
                "label": i % 2,
            }
        )
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_thread():
    # tiny models run fastest single threaded; oversubscribed CPUs make multithreading very slow
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("probe")
    model = make_random_llama(d / "m", layers=3)
    return {
        "model": model,
        "engine": TransformersEngine.load(model),
        "train": _write(d / "train.jsonl", _rows(240, 1)),
        "eval": _write(d / "eval.jsonl", _rows(60, 2)),
        "dir": d,
    }


@pytest.fixture(scope="module")
def trained(setup):
    return train_probe(
        setup["engine"],
        [setup["train"]],
        model_dir=setup["model"],
        eval_data=[setup["eval"]],
        config=TrainConfig(target_fpr=0.02),
        progress=False,
    )


def test_probe_detects_the_marker_on_held_out_rows(trained):
    m = trained.monitor.meta["metrics"]
    assert m["heldout"]["rows"] == 48 and m["heldout"]["auroc"] > 0.9
    assert m["eval"]["rows"] == 60 and m["eval"]["auroc"] > 0.9


def test_sweep_covers_every_layer_and_keeps_the_cross_validated_choice(trained):
    meta = trained.monitor.meta
    sweep = meta["metrics"]["sweep"]
    assert [r["layer"] for r in sweep] == [0, 1, 2]
    # the held-out split is only reported: the layer is cross-validation's best candidate's
    table = meta["metrics"]["selection"]["table"]
    assert meta["metrics"]["selection"]["folds"] == "kfold"
    assert trained.monitor.layer == table[0]["layer"]
    assert table[0]["cv_worst_tpr"] == max(r["cv_worst_tpr"] for r in table)
    assert next(r for r in sweep if r["layer"] == trained.monitor.layer)["heldout_auroc"] > 0.9


def test_best_layer_breaks_saturated_ties_by_token_auroc_then_mid_depth():
    from guard.probe.train import LayerResult, best_layer

    def result(layer, auroc, tpr, token):
        return LayerResult(
            layer, None, {"auroc": auroc, "tpr_at_target_fpr": tpr, "token_auroc": token}, None
        )

    rows = [
        result(0, 1.0, 1.0, 0.90),
        result(1, 1.0, 1.0, 0.92),
        result(2, 0.99, 1.0, 0.99),
        result(3, 1.0, 0.9, 1.0),
    ]
    assert best_layer(rows, 4).layer == 1
    ties = [result(layer, 1.0, 1.0, 0.9) for layer in range(8)]
    assert best_layer(ties, 8).layer in (3, 4)
    assert best_layer([result(0, float("nan"), 0.0, 0.5), result(1, 0.6, 0.0, 0.5)], 2).layer == 1


def test_threshold_gives_the_target_fpr_on_calibration_negatives(trained, setup):
    from guard.probe.collect import collect
    from guard.probe.train import row_scores

    mon = trained.monitor
    negatives = [ex for ex in read_jsonl(setup["train"]) if ex.label == 0]
    _, rows = row_scores(mon, collect(setup["engine"], negatives, [mon.layer], progress=False))
    fpr = float(np.mean(rows > mon.threshold))
    cal = mon.meta["metrics"]["calibration"]
    # 120 negatives hold 2% with 90% confidence only with none above the threshold
    # (1 - 0.1 ** (1 / 120) = 1.9%); the empirical quantile would have let 2 of them fire
    assert len(negatives) == 120 and fpr == 0.0 and cal["fpr_at_threshold"] == pytest.approx(fpr)
    assert cal["confidence"] == 0.9 and cal["meets_target"]
    assert cal["fpr_upper_bound"] == pytest.approx(1 - 0.1 ** (1 / 120), rel=1e-6)


def test_diffmean_method(setup):
    res = train_probe(
        setup["engine"],
        [setup["train"]],
        layers=[1],
        config=TrainConfig(method="diffmean"),
        progress=False,
    )
    assert res.monitor.mean is None and res.monitor.meta["method"] == "diffmean"
    assert res.monitor.meta["metrics"]["heldout"]["auroc"] > 0.9


def test_cli_train_then_eval(setup, capsys):
    out = setup["dir"] / "cli_probe"
    rc = guard_main(
        [
            "probe",
            "train",
            "--model",
            str(setup["model"]),
            "--data",
            str(setup["train"]),
            "--eval",
            str(setup["eval"]),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    lines = printed.splitlines()
    assert (
        lines[0].split()[:2] == ["layer", "AUROC"] and sum("*" in line for line in lines[1:4]) == 1
    )
    assert "held-out: 48 rows" in printed and "eval: 60 rows" in printed
    assert "false fires on new benign answers: <= " in printed and "90% confidence" in printed
    meta = json.loads((out / "probe.json").read_text())
    assert meta["model"]["config_sha256"] and meta["training"]["data"][0]["path"] == str(
        setup["train"]
    )
    mon = ProbeMonitor.load(out, name="p")
    mon.check_compatible(setup["engine"].info, model_dir=setup["model"])

    rc = guard_main(
        [
            "probe",
            "eval",
            str(out),
            "--model",
            str(setup["model"]),
            "--data",
            str(setup["eval"]),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and f"layer {mon.layer}" in printed
    assert f"AUROC {meta['metrics']['eval']['auroc']:.4f}" in printed


def test_cli_single_layer_and_bad_data(setup, tmp_path, capsys):
    rc = guard_main(
        [
            "probe",
            "train",
            "--model",
            str(setup["model"]),
            "--data",
            str(setup["train"]),
            "--layer",
            "2",
            "--out",
            str(tmp_path / "p"),
            "--quiet",
        ]
    )
    assert rc == 0 and json.loads((tmp_path / "p" / "probe.json").read_text())["layer"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": 0}\n{"prompt": "a"}\n')
    rc = guard_main(
        [
            "probe",
            "train",
            "--model",
            str(setup["model"]),
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "q"),
        ]
    )
    assert rc == 2 and "bad.jsonl:2: 'completion' must be a string" in capsys.readouterr().err


def test_training_is_deterministic(setup):
    runs = [
        train_probe(setup["engine"], [setup["train"]], layers=[1], progress=False).monitor
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0].direction, runs[1].direction, rtol=0, atol=0)
    assert runs[0].threshold == runs[1].threshold


def test_cli_rejects_bad_layers_and_settings(setup, tmp_path, capsys):
    base = [
        "train",
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["train"]),
        "--out",
        str(tmp_path / "p"),
    ]
    assert guard_main(["probe", *base, "--layer", "7"]) == 2
    assert "layers [7] out of range: the model has 3 layers" in capsys.readouterr().err
    assert guard_main(["probe", *base, "--alpha", "0"]) == 2
    assert "alpha must be in (0, 1]" in capsys.readouterr().err
    assert guard_main(["probe", *base, "--target-fpr", "1"]) == 2
    assert "target_fpr must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_target_zero_is_above_every_calibration_answer(setup, tmp_path, capsys):
    """``--target-fpr 0``: the threshold is the highest calibration answer, said plainly (no
    confidence bound and no "too few answers" warning, which no number of answers could lift)."""
    args = ["probe", "train", "--model", str(setup["model"]), "--data", str(setup["train"])]
    assert guard_main([*args, "--out", str(tmp_path / "p"), "--target-fpr", "0"]) == 0
    out = capsys.readouterr().out
    assert "target 0: the threshold is the highest of the" in out
    assert "need >=" not in out and "warning" not in out
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    cal = meta["metrics"]["calibration"]
    assert cal["negatives_needed"] is None and cal["fpr_at_threshold"] == 0.0
