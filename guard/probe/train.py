"""Probe training: split, choice by cross-validation, fit, row-level evaluation, threshold calibration.

Invariants of :func:`train_probe`:

- Rows (not tokens) are split into train / held-out, seeded and stratified by label, so no text
  of a held-out row is ever trained on. Reviewed rows (``"source": "review"``, from
  :func:`guard.loop.export_labelled`) are always in the train split: they are the corrections
  the new probe must learn; their negatives (false positives) also join threshold calibration.
- The saved probe is the one fitted on the train split, so the held-out metrics in probe.json
  describe exactly the saved direction.
- All metrics are row level on the monitor's own decision statistic: the maximum over a
  completion of the aggregated per-token score (see :func:`guard.probe.metrics.row_max_scores`).
- Layer, aggregation, method and token labels not fixed by the config are chosen by
  cross-validation on the train split only (:mod:`guard.probe.select`: leave one harm category out
  when rows carry categories, else k-fold); the held-out split and ``--eval`` data are reported,
  never used to choose.
- Threshold calibration, by default, uses the model's own sampled answers to benign prompts
  (:mod:`guard.probe.sample`), scored as live: the threshold is the smallest of their scores (max
  over the answer of the aggregated score) at which a one-sided ``fpr_confidence`` upper bound on
  the false-fire rate on new answers is at most ``target_fpr`` (split-conformal /
  Clopper-Pearson, :func:`guard.probe.metrics.threshold_at_fpr_bound`), plus
  :data:`CALIBRATION_MARGIN`. The same sampled answers set every fold's threshold in
  cross-validation, so the choice is made under the rule the probe is deployed with.
- A benign prompt's sampled answer may itself be harmful; counted as a negative it would push
  the threshold above exactly what the probe should catch. With a judge, answers it calls unsafe
  are dropped before cross-validation and calibration; with or without one, the highest-scoring
  calibration answers are reported so a reviewer can read what the threshold was set against.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from guard.engine.base import Engine
from guard.errors import InvalidRequestError
from guard.judge import JudgeError, NamedJudge
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor, config_fingerprint
from guard.probe import metrics as M
from guard.probe import select as S
from guard.probe.cache import ActivationCache
from guard.probe.collect import Activations, Pooling, Span, collect
from guard.probe.data import DataError, Example, read_files
from guard.probe.fit import Method
from guard.probe.labels import TOKEN_LABELS, TokenLabels, has_hazard, hazard_tokens
from guard.probe.sample import SampledAnswers, read_prompts, sample_answers
from guard.sampling import SamplingParams


@dataclass(frozen=True)
class CalibrationSampling:
    """How ``guard probe train`` samples the model's own answers to calibrate the threshold."""

    n: int = 4
    """Answers sampled per calibration prompt."""
    temperature: float = 1.0
    """Sampling temperature (1.0: the model's own distribution, the default of chat clients and of
    guard's policies)."""
    top_p: float = 1.0
    max_tokens: int = 96
    """Longest answer; a longer one is cut, as a client's ``max_tokens`` would."""
    seed: int = 0
    max_prompts: int = 100
    """With prompts taken from the training rows (no ``--calibrate-prompts``): use at most this many."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1 or self.max_prompts < 1:
            raise ValueError("calibration samples, max_tokens and max_prompts must be >= 1")

    def params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens
        )


@dataclass
class TrainConfig:
    """Everything that decides a probe besides its data and model. ``None`` means: chosen by
    cross-validation (:mod:`guard.probe.select`)."""

    method: Method | None = None
    """``logreg`` (standardised logistic regression) or ``diffmean`` (difference of means)."""
    l2: float = 0.1
    """L2 penalty of ``logreg`` (on the mean class-balanced loss)."""
    target_fpr: float = 0.01
    """Row-level false-positive rate the threshold is calibrated for, in [0, 1). 0 puts the
    threshold at the highest calibration answer (none fires), with no confidence bound on new
    answers: finitely many calibration answers cannot bound a rate of 0."""
    fpr_confidence: float = 0.9
    """Confidence with which the calibrated threshold holds ``target_fpr`` on new answers: the
    threshold is set so a one-sided Clopper-Pearson upper bound at this confidence on its false-fire
    rate is at most ``target_fpr`` (:func:`guard.probe.metrics.threshold_at_fpr_bound`), not the
    empirical quantile, which exceeds the target on new answers about half the time."""
    heldout_frac: float = 0.2
    """Fraction of rows of each label held out for evaluation and layer choice."""
    seed: int = 0
    """Seed of the train / held-out split."""
    aggregation: AggregationSpec | None = None
    """Aggregation stored with the probe and used by every row-level metric."""
    token_labels: TokenLabels | None = None
    """Which tokens of a positive completion are positive (:mod:`guard.probe.labels`)."""
    alpha: float = 0.5
    """EMA weight of the EMA aggregation candidate."""
    window: int = 4
    """Window of the window aggregation candidate."""
    folds: int = 5
    """Folds of the k-fold cross-validation used when rows carry no categories."""
    pooling: Pooling = "token"
    """What the probe is fitted on: every completion token (``token``), or one vector per row, the mean
    (``mean``) or last (``last``) completion-token activation. The fitted probe still scores every
    token at serving time, so all metrics stay row-max of aggregated per-token scores."""

    span: Span = "completion"
    """Tokens the probe reads: ``completion`` (an output monitor) or ``prompt`` (a prompt-scope
    monitor, e.g. a deliberation risk monitor; labels then mark harmful requests)."""

    def __post_init__(self) -> None:
        if self.span not in ("completion", "prompt"):
            raise ValueError(f"span must be completion or prompt, got {self.span!r}")
        if self.pooling not in ("token", "mean", "last"):
            raise ValueError(f"pooling must be token, mean or last, got {self.pooling!r}")
        if not 0.0 < self.heldout_frac < 1.0:
            raise ValueError(f"heldout_frac must be in (0, 1), got {self.heldout_frac}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {self.target_fpr}")
        if not 0.0 < self.fpr_confidence < 1.0:
            raise ValueError(f"fpr_confidence must be in (0, 1), got {self.fpr_confidence}")
        if self.token_labels is not None and self.token_labels not in TOKEN_LABELS:
            raise ValueError(
                f"token labels must be one of {', '.join(TOKEN_LABELS)}, got {self.token_labels!r}"
            )
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        AggregationSpec("ema", self.alpha, self.window)  # validates alpha and window

    def candidates(self, layers: list[int], hazard_known: bool) -> tuple[list, list, list]:
        """(methods, token labels, aggregations) to cross-validate over ``layers``."""
        methods = [self.method] if self.method else ["logreg", "diffmean"]
        if self.token_labels:
            labels = [self.token_labels]
        else:
            labels = list(TOKEN_LABELS) if hazard_known and self.pooling == "token" else ["all"]
        aggs = [self.aggregation] if self.aggregation else S.aggregations(self.alpha, self.window)
        return methods, labels, aggs


class LayerResult(NamedTuple):
    """One row of the layer sweep."""

    layer: int
    monitor: ProbeMonitor
    """The probe fitted on the train split at this layer (threshold not yet calibrated)."""
    heldout: dict[str, Any]
    """:func:`evaluate` on the held-out split."""
    eval: dict[str, Any] | None
    """:func:`evaluate` on the ``--eval`` data, if any."""


class TrainResult(NamedTuple):
    monitor: ProbeMonitor
    """The chosen probe with its calibrated threshold and probe.json metadata in ``meta``."""
    sweep: list[LayerResult]


def split_rows(labels: np.ndarray, heldout_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified row split: ``(train, heldout)`` sorted index arrays; each label keeps >= 1 row per side."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        if len(idx) < 2:
            raise DataError(
                f"need at least 2 rows with label {label} to split train/held-out, found {len(idx)}"
            )
        idx = rng.permutation(idx)
        n_held = min(max(1, int(round(heldout_frac * len(idx)))), len(idx) - 1)
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def row_scores(
    monitor: ProbeMonitor, acts: Activations, aggregation: AggregationSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(per-token scores, per-row max aggregated scores) of ``monitor`` on ``acts``."""
    tok = monitor.score_tensor(acts.hidden[monitor.layer]).numpy()
    return tok, M.row_max_scores(tok, acts.row, acts.n_rows, aggregation or monitor.aggregation)


def evaluate(monitor: ProbeMonitor, acts: Activations, target_fpr: float = 0.01) -> dict[str, Any]:
    """Row-level AUROC, TPR at ``target_fpr`` (threshold from these negatives), token AUROC, and TPR/FPR
    at the monitor's own threshold."""
    tok, rows = row_scores(monitor, acts)
    tpr, fpr = M.rates_at(rows, acts.labels, monitor.threshold)
    return {
        "rows": int(acts.n_rows),
        "positives": int(acts.labels.sum()),
        "negatives": int((acts.labels == 0).sum()),
        "auroc": M.auroc(rows, acts.labels),
        "tpr_at_target_fpr": M.tpr_at_fpr(rows, acts.labels, target_fpr),
        "target_fpr": target_fpr,
        "token_auroc": M.auroc(tok, acts.token_labels()),
        "threshold": monitor.threshold,
        "tpr_at_threshold": tpr,
        "fpr_at_threshold": fpr,
    }


def fit_layer(
    acts: Activations,
    layer: int,
    config: TrainConfig,
    name: str = "probe",
    *,
    hazard: np.ndarray | None = None,
    candidate: S.Candidate | None = None,
) -> ProbeMonitor:
    """Fit at ``layer`` with the candidate's method, token labels and aggregation (default: the
    config's, ``logreg`` / ``all`` / EMA where it leaves them open)."""
    method = candidate.method if candidate else (config.method or "logreg")
    labels = candidate.labels if candidate else (config.token_labels or "all")
    agg = (
        candidate.aggregation
        if candidate
        else (config.aggregation or AggregationSpec("ema", config.alpha, config.window))
    )
    hz = hazard if hazard is not None else np.full(acts.n_rows, -1, dtype=np.int64)
    mon = S.fit_candidate(
        acts, hz, layer, method, labels, l2=config.l2, pooling=config.pooling, name=name
    )
    mon.aggregation = agg
    return mon


def sweep_layers(
    train: Activations,
    heldout: Activations,
    layers: list[int],
    config: TrainConfig,
    eval_acts: Activations | None = None,
    *,
    hazard: np.ndarray | None = None,
    candidate: S.Candidate | None = None,
) -> list[LayerResult]:
    """Fit at every layer (with ``candidate``'s other choices) and evaluate on the held-out split."""
    out = []
    for layer in layers:
        mon = fit_layer(
            train,
            layer,
            config,
            hazard=hazard,
            candidate=candidate._replace(layer=layer) if candidate else None,
        )
        out.append(
            LayerResult(
                layer,
                mon,
                evaluate(mon, heldout, config.target_fpr),
                evaluate(mon, eval_acts, config.target_fpr) if eval_acts is not None else None,
            )
        )
    return out


def best_layer(results: list[LayerResult], num_layers: int) -> LayerResult:
    """Highest held-out row AUROC, then TPR at the target FPR.

    Easy data saturates both (AUROC 1.0 at every layer), so ties go to the higher held-out
    *token* AUROC, which saturates later, and then to the layer nearest mid-depth, where probes
    usually generalise best.
    """

    def key(r: LayerResult):
        h = r.heldout
        return (
            _nan_low(h["auroc"]),
            _nan_low(h["tpr_at_target_fpr"]),
            _nan_low(h["token_auroc"]),
            -abs(r.layer - (num_layers - 1) / 2),
        )

    return max(results, key=key)


def _nan_low(v: float) -> float:
    return -1.0 if v != v else v


class Selection(NamedTuple):
    """What cross-validation chose, and on what."""

    candidate: S.Candidate
    folds: S.Folds | None
    """``None`` when the options left a single candidate (nothing to choose)."""
    scores: list[S.Score]
    """Every candidate, best first."""


def train_probe(
    engine: Engine,
    data: list[str | Path],
    *,
    model_dir: str | Path | None = None,
    layers: list[int] | None = None,
    eval_data: Sequence[str | Path] = (),
    calibration: Sequence[str | Path] = (),
    config: TrainConfig | None = None,
    name: str = "probe",
    progress: bool = True,
    cache: ActivationCache | None = None,
    calibrate_prompts: str | Path | None = None,
    sampling: CalibrationSampling | None = None,
    judge: NamedJudge | None = None,
) -> TrainResult:
    """Train a probe on ``data`` (JSONL paths). ``layers=None`` considers every layer.

    Calibration negatives, in order of preference: the model's own answers sampled from
    ``calibrate_prompts`` (``sampling``); the label-0 rows of ``calibration`` files; the model's own
    answers to the prompts of ``data``'s benign rows (rows of categories without label-1 rows); the
    label-0 rows of ``data``. With ``cache``, activations seen before are read from disk.

    ``judge`` (a verdict ``text -> unsafe`` and its option) reads every sampled answer; those it calls
    unsafe are dropped from calibration and cross-validation: the model's own answer to a benign
    prompt may itself be harmful, and a threshold set above it would let such answers through. How
    many it dropped, with a few clipped examples (``excluded_unsafe``), and, with or without a
    judge, the highest-scoring sampled answers left (``highest``: the top of the sampled answers
    the threshold was set against) are reported in ``metrics.calibration`` for review.

    Numbered phases: (1) read data, (2) collect activations once for all layers, (3) split rows,
    (4) sample calibration answers, (5) choose by cross-validation on the train split, (6) fit the
    choice at every layer on the train split and keep the chosen layer's, (7) calibrate its
    threshold, (8) evaluate and assemble probe.json metadata.
    """
    config = config or TrainConfig()
    sampling = sampling or CalibrationSampling()
    if calibrate_prompts is not None and calibration:
        raise InvalidRequestError(
            "calibrate on sampled answers (--calibrate-prompts) or on rows (--calibration), "
            "not both",
            param="calibration",
        )
    # 1. data
    examples = read_files(list(data))
    eval_examples = read_files(list(eval_data)) if eval_data else []
    calib_examples = read_files(list(calibration)) if calibration else []
    cv_layers = sorted(set(layers)) if layers else spread_layers(engine.info.num_layers)
    layers = sorted(set(layers)) if layers else list(range(engine.info.num_layers))
    bad = [layer for layer in layers if not 0 <= layer < engine.info.num_layers]
    if bad:
        raise InvalidRequestError(
            f"layers {bad} out of range: the model has {engine.info.num_layers} layers "
            f"(0..{engine.info.num_layers - 1})",
            param="layer",
        )
    chats, cal_source = _calibration_chats(
        examples, calibrate_prompts, bool(calib_examples), sampling, config
    )
    if judge is not None and not chats:
        raise InvalidRequestError(
            f"{judge.option} reads the model's sampled calibration answers, and there are none: "
            "calibration uses rows (--calibration, --span prompt, or data without "
            "benign-category rows); give --calibrate-prompts or drop the judge",
            param=judge.param,
        )
    # 2. activations, every layer in one pass
    acts = collect(
        engine,
        examples,
        layers,
        desc="train data",
        progress=progress,
        cache=cache,
        span=config.span,
    )
    eval_acts = (
        collect(
            engine,
            eval_examples,
            layers,
            desc="eval data",
            progress=progress,
            cache=cache,
            span=config.span,
        )
        if eval_examples
        else None
    )
    hazard = (
        hazard_tokens(engine, examples)
        if config.span == "completion"
        else np.full(len(examples), -1, dtype=np.int64)
    )
    # 3. split; reviewed rows are always trained on
    reviewed = np.array([ex.reviewed for ex in examples], dtype=bool)
    original = np.flatnonzero(~reviewed)
    train_idx, held_idx = split_rows(acts.labels[original], config.heldout_frac, config.seed)
    train_idx = np.sort(np.concatenate([original[train_idx], np.flatnonzero(reviewed)]))
    held_idx = original[held_idx]
    train, heldout = acts.select(train_idx), acts.select(held_idx)
    # 4. the model's own answers to benign prompts (chats chosen in phase 1)
    sampled = (
        sample_answers(
            engine,
            chats,
            cv_layers,
            n=sampling.n,
            params=sampling.params(),
            seed=sampling.seed,
            progress=progress,
            cache=cache,
        )
        if chats
        else None
    )
    excluded: list[str] = []
    if judge is not None and sampled is not None:
        sampled, excluded = _judged(sampled, judge)
    # 5. choose on the train split only
    selection = choose(
        train,
        hazard[train_idx],
        [examples[i].category for i in train_idx],
        cv_layers,
        config,
        engine.info.num_layers,
        sampled.acts if sampled else None,
        progress,
    )
    # 6. the choice at every layer (reported), the chosen layer's probe kept
    results = sweep_layers(
        train,
        heldout,
        layers,
        config,
        eval_acts,
        hazard=hazard[train_idx],
        candidate=selection.candidate,
    )
    best = next(r for r in results if r.layer == selection.candidate.layer)
    monitor = best.monitor
    monitor.name = name
    # 7. calibrate (reviewed false positives always join)
    reviewed_neg = np.flatnonzero(reviewed & (acts.labels == 0))
    if sampled is not None:
        negatives, source = sampled.acts, [cal_source]
    elif calib_examples:
        negatives = collect(
            engine,
            [e for e in calib_examples if e.label == 0],
            [best.layer],
            desc="calibration data",
            progress=progress,
            cache=cache,
            span=config.span,
        )
        source = [str(p) for p in calibration]
    else:
        negatives, source = acts.select(np.flatnonzero(acts.labels == 0)), ["train+heldout"]
        reviewed_neg = np.zeros(0, dtype=np.int64)
    if len(reviewed_neg):
        negatives = _stack([negatives, acts.select(reviewed_neg)], best.layer)
        source.append(f"{len(reviewed_neg)} reviewed negatives of --data")
    calibration_info = {
        "source": source[0]
        if len(source) == 1 and (sampled is not None or not calib_examples)
        else source,
        "sampled": sampled is not None,
        **calibrate(monitor, negatives, config.target_fpr, config.fpr_confidence),
    }
    if sampled is not None:
        calibration_info["judge"] = judge.option if judge is not None else None
        calibration_info["excluded_unsafe"] = {
            "count": len(excluded),
            "examples": [clip(t) for t in excluded[:EXCLUDED_SHOWN]],
        }
        calibration_info["highest"] = highest_answers(monitor, sampled)
    # 8. final metrics and provenance
    metrics = {
        "heldout": evaluate(monitor, heldout, config.target_fpr),
        "eval": evaluate(monitor, eval_acts, config.target_fpr) if eval_acts is not None else None,
        "calibration": calibration_info,
        "sweep": [_sweep_row(r) for r in results],
        "selection": _selection_info(selection),
    }
    training = {
        "data": _file_info(data),
        "eval_data": _file_info(eval_data),
        "calibration_data": _file_info(calibration),
        "calibrate_prompts": _file_info([calibrate_prompts]) if calibrate_prompts else None,
        "calibration_sampling": (
            dict(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
            )
            if sampled is not None
            else None
        ),
        "rows": acts.n_rows,
        "train_rows": len(train_idx),
        "heldout_rows": len(held_idx),
        "reviewed_rows": int(reviewed.sum()),
        "train_tokens": len(train.row),
        "seed": config.seed,
        "heldout_frac": config.heldout_frac,
        "l2": config.l2 if selection.candidate.method == "logreg" else None,
        "layers_swept": layers,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    monitor.meta = _json_safe(
        {
            "model": _model_info(engine, model_dir),
            "method": selection.candidate.method,
            "token_labels": selection.candidate.labels,
            "pooling": config.pooling,
            "span": config.span,
            "target_fpr": config.target_fpr,
            "metrics": metrics,
            "training": training,
        }
    )
    return TrainResult(monitor, results)


MAX_CV_LAYERS = 8
"""Layers cross-validation considers when none are named: all of a model with at most this many,
else this many spread evenly from the first to the last (the cost is folds x layers x methods x
token labels fits; ``--layers`` names others)."""


def spread_layers(num_layers: int, most: int = MAX_CV_LAYERS) -> list[int]:
    """Every layer, or ``most`` layers evenly spaced from 0 to ``num_layers - 1``."""
    if num_layers <= most:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (most - 1)) for i in range(most)})


def choose(
    train: Activations,
    hazard: np.ndarray,
    categories: list[str | None],
    layers: list[int],
    config: TrainConfig,
    num_layers: int,
    calibration: Activations | None,
    progress: bool,
) -> Selection:
    """Cross-validate every candidate the config leaves open (:mod:`guard.probe.select`) and take the best."""
    methods, labels, aggs = config.candidates(layers, has_hazard(train.labels, hazard))
    if len(layers) * len(methods) * len(labels) * len(aggs) == 1:
        return Selection(S.Candidate(layers[0], methods[0], labels[0], aggs[0]), None, [])
    folds = S.make_folds(train.labels, categories, config.seed, config.folds)
    scores = S.cross_validate(
        train,
        hazard,
        folds,
        layers=layers,
        methods=methods,
        labels=labels,
        aggs=aggs,
        calibration=calibration,
        target_fpr=config.target_fpr,
        confidence=config.fpr_confidence,
        l2=config.l2,
        pooling=config.pooling,
        progress=progress,
    )
    scores = S.ranked(scores, num_layers)
    return Selection(scores[0].candidate, folds, scores)


def _judged(sampled: SampledAnswers, judge: NamedJudge) -> tuple[SampledAnswers, list[str]]:
    """``sampled`` without the answers ``judge`` calls unsafe, and those answers' texts. A judge
    that raises or returns a non-bool, or that calls every answer unsafe, is a :class:`JudgeError`."""
    unsafe = []
    for i, text in enumerate(sampled.texts):
        try:
            verdict = judge.verdict(text)
        except JudgeError:
            raise
        except Exception as exc:
            raise JudgeError(
                f"{judge.option} raised on sampled calibration answer {i} ({clip(text)!r}): "
                f"{type(exc).__name__}: {exc}",
                param=judge.param,
            ) from exc
        if not isinstance(verdict, bool):
            raise JudgeError(
                f"{judge.option} returned {type(verdict).__name__} on sampled calibration answer "
                f"{i}, not a bool",
                param=judge.param,
            )
        unsafe.append(verdict)
    if all(unsafe):
        raise JudgeError(
            f"{judge.option} called every one of the {len(unsafe)} sampled calibration answers "
            "unsafe; check the judge and the calibration prompts",
            param=judge.param,
        )
    keep = np.flatnonzero(~np.array(unsafe, dtype=bool))
    kept = SampledAnswers(sampled.acts.select(keep), [sampled.texts[i] for i in keep])
    return kept, [t for t, u in zip(sampled.texts, unsafe, strict=True) if u]


EXCLUDED_SHOWN = 3
"""Answers the judge dropped that ``metrics.calibration.excluded_unsafe`` quotes (clipped): the
probe file should not become a store of the model's harmful text."""


def clip(text: str, most: int = 160) -> str:
    """``text``, cut to ``most`` characters with ``...`` where it is longer."""
    return text if len(text) <= most else text[: most - 3] + "..."


HIGHEST_SHOWN = 3
"""Sampled answers ``metrics.calibration.highest`` lists: the top of the sampled answers the
threshold was set against (reviewed negatives of ``--data`` join calibration but are not ranked
here), for a reviewer to check that none of them is harmful."""


def highest_answers(monitor: ProbeMonitor, sampled: SampledAnswers) -> list[dict[str, Any]]:
    """The :data:`HIGHEST_SHOWN` highest-scoring sampled answers under ``monitor``, best first, as
    ``{"score", "fires", "text"}``."""
    _, rows = row_scores(monitor, sampled.acts)
    top = np.argsort(-rows, kind="stable")[:HIGHEST_SHOWN]
    return [
        {
            "score": float(rows[i]),
            "fires": bool(rows[i] > monitor.threshold),
            "text": sampled.texts[i],
        }
        for i in top
    ]


def _calibration_chats(
    examples: list[Example],
    prompts_file: str | Path | None,
    have_rows: bool,
    sampling: CalibrationSampling,
    config: TrainConfig,
) -> tuple[list, str]:
    """The chats to sample calibration answers from, and a description; ``[]`` to use rows instead."""
    how = f"{sampling.n} sampled answers each at temperature {sampling.temperature:g}"
    if prompts_file is not None:
        chats = read_prompts(prompts_file)
        return chats, f"model's own answers to {len(chats)} prompts of {prompts_file}, {how}"
    if have_rows or config.span != "completion":
        return [], ""
    harm = {ex.category for ex in examples if ex.label == 1}
    seen, chats = set(), []
    for ex in examples:
        if (
            ex.category is not None
            and ex.category not in harm
            and ex.label == 0
            and not ex.raw_prompt
        ):
            key = repr(ex.chat())
            if key not in seen and len(chats) < sampling.max_prompts:
                seen.add(key)
                chats.append(ex.chat())
    return chats, f"model's own answers to {len(chats)} benign-category prompts of --data, {how}"


def _selection_info(sel: Selection) -> dict[str, Any]:
    if sel.folds is None:
        return {
            "folds": None,
            "criterion": "fixed by the options (a single candidate)",
            "chosen": S.describe(sel.candidate),
            "table": [],
        }
    return {
        "folds": sel.folds.kind,
        "fold_names": sel.folds.names,
        "criterion": S.CRITERION,
        "chosen": S.describe(sel.candidate),
        "table": [S.score_to_dict(s) for s in sel.scores],
    }


def _stack(parts: list[Activations], layer: int) -> Activations:
    """The rows of ``parts`` one after another, at ``layer`` only."""
    offsets = np.cumsum([0] + [p.n_rows for p in parts])
    return Activations(
        {layer: torch.cat([p.hidden[layer] for p in parts])},
        np.concatenate([p.row + o for p, o in zip(parts, offsets[:-1], strict=True)]),
        np.concatenate([p.labels for p in parts]),
    )


def decisions(monitor: ProbeMonitor, acts: Activations) -> dict[str, Any]:
    """What ``monitor`` decides on each row at its own threshold and aggregation: positives caught,
    negatives fired on (false positives), and row AUROC (``nan`` with one class)."""
    _, rows = row_scores(monitor, acts)
    fired, pos = rows > monitor.threshold, acts.labels == 1
    return {
        "rows": int(acts.n_rows),
        "positives": int(pos.sum()),
        "caught": int((fired & pos).sum()),
        "negatives": int((~pos).sum()),
        "false_positives": int((fired & ~pos).sum()),
        "auroc": M.auroc(rows, acts.labels),
        "threshold": monitor.threshold,
    }


CALIBRATION_MARGIN = 1e-3
"""Logit units by which the threshold clears the boundary negative's score. The threshold is that
row's score, and the row must not fire (``score > threshold``) when its score is computed again on
another path (token-by-token decoding, other batch shapes), which differs in the last digits."""


def calibrate(
    monitor: ProbeMonitor,
    negatives: Activations,
    target_fpr: float,
    confidence: float = 0.9,
) -> dict[str, Any]:
    """Set ``monitor.threshold`` so that a one-sided ``confidence`` upper bound on its false-positive
    rate on new negatives like ``negatives`` is at most ``target_fpr``
    (:func:`guard.probe.metrics.threshold_at_fpr_bound`), with the :data:`CALIBRATION_MARGIN` above
    the boundary row; report the rate on ``negatives`` and the bound."""
    if negatives.n_rows == 0 or negatives.labels.any():
        raise DataError(
            "threshold calibration needs negative (label 0) rows only, and at least one"
        )
    _, rows = row_scores(monitor, negatives)
    bt = M.threshold_at_fpr_bound(rows, target_fpr, confidence)
    t = bt.threshold
    if 0.0 < t < 1.0:
        t = float(1.0 / (1.0 + np.exp(-(np.log(t / (1.0 - t)) + CALIBRATION_MARGIN))))
    monitor.threshold = t
    return {
        "negatives": int(negatives.n_rows),
        "fpr_at_threshold": float(np.mean(rows > monitor.threshold)),
        "confidence": confidence,
        "fpr_upper_bound": bt.fpr_bound,
        "meets_target": bt.meets_target,
        "negatives_needed": M.negatives_needed(target_fpr, confidence),
    }


def _sweep_row(r: LayerResult) -> dict[str, Any]:
    return {
        "layer": r.layer,
        "heldout_auroc": r.heldout["auroc"],
        "heldout_tpr_at_target_fpr": r.heldout["tpr_at_target_fpr"],
        "heldout_token_auroc": r.heldout["token_auroc"],
        "eval_auroc": r.eval["auroc"] if r.eval else None,
        "eval_tpr_at_target_fpr": r.eval["tpr_at_target_fpr"] if r.eval else None,
    }


def _model_info(engine: Engine, model_dir: str | Path | None) -> dict[str, Any]:
    info = engine.info
    return {
        "name": info.name,
        "path": str(model_dir) if model_dir else None,
        "config_sha256": config_fingerprint(model_dir) if model_dir else None,
        "num_layers": info.num_layers,
        "d_model": info.d_model,
    }


def _file_info(paths) -> list[dict[str, Any]]:
    return [
        {"path": str(p), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()} for p in paths
    ]


def _json_safe(obj):
    """NaN (a metric with one class missing) becomes ``null`` so probe.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
