"""Choosing a probe's layer, aggregation, method and token labels by cross-validation.

Folds (:func:`make_folds`):

- ``category`` (rows carry ``category`` and at least two categories have label-1 rows): one fold per
  harm category, i.e. per category with a label-1 row. Fold ``c`` holds out every row of category
  ``c`` (its harmful answers and its refusals) plus, round robin in name order, a share of the
  negative-only categories (benign topics), so the held-out negatives are unseen topics too. Rows
  without a category are dealt round robin by row index.
- ``kfold`` otherwise: stratified k folds by row (seeded).

A candidate is fitted on the other folds' rows only and scored on the held-out fold, with the
deployed decision rule: row statistic = max over the answer of the aggregated per-token score;
threshold = the one calibration would set at ``target_fpr`` and ``confidence`` on the calibration
negatives (:func:`guard.probe.metrics.threshold_at_fpr_bound`; the model's own sampled benign
answers when training has them, else the training folds' negatives).

Criterion (:data:`CRITERION`, :func:`rank_key`), in order, higher is better:
1. the worst fold's TPR at that threshold: recall on the unseen category the candidate transfers to
   least, at the false-fire rate it will be deployed with (the goal is a bound on every category a
   user brings, so the weakest one decides, not the average);
2. the mean over folds of that TPR;
3. the worst fold's :func:`margin`: how far above the threshold that category's unsafe answers sit,
   in units of the benign answers' spread (separates candidates whose TPRs saturate; a larger
   margin survives a larger shift between training text and live answers);
4. mean over folds of the TPR at a strict threshold, above every calibration negative;
5. mean held-out row AUROC; 6. lower mean held-out FPR; 7. mean held-out token AUROC;
8. the simpler candidate (labels ``all``, aggregation ``none``, then ``ema``, then ``window``;
   method ``logreg`` before ``diffmean``); 9. the layer nearest mid-depth.
"""

from __future__ import annotations

import sys
from typing import Literal, NamedTuple

import numpy as np
import torch

from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.probe import metrics as M
from guard.probe.collect import Activations, Pooling
from guard.probe.fit import Method, fit
from guard.probe.labels import TOKEN_LABELS, TokenLabels, token_selection

CRITERION = (
    "worst left-out category's TPR at the calibrated threshold, then mean TPR, then worst category's "
    "margin above the threshold, TPR above every calibration answer, AUROC, lower FPR, token AUROC, "
    "simpler candidate, mid-depth layer"
)


class Candidate(NamedTuple):
    """One combination of choices."""

    layer: int
    method: Method
    labels: TokenLabels
    aggregation: AggregationSpec


class Folds(NamedTuple):
    """Cross-validation folds over the rows of a training set."""

    kind: Literal["category", "kfold"]
    names: list[str]
    """Per fold: the held-out harm category (``category``) or ``fold i`` (``kfold``)."""
    heldout: list[np.ndarray]
    """Per fold: sorted row indices held out."""

    def train(self, fold: int, n_rows: int) -> np.ndarray:
        """Row indices a candidate scored on ``fold`` is fitted on (every row not held out)."""
        mask = np.ones(n_rows, dtype=bool)
        mask[self.heldout[fold]] = False
        return np.flatnonzero(mask)


class Score(NamedTuple):
    """Cross-validated scores of one candidate (means over folds unless named otherwise)."""

    candidate: Candidate
    tpr: float
    strict_tpr: float
    worst_tpr: float
    auroc: float
    fpr: float
    token_auroc: float
    fold_tpr: list[float]
    """Per fold, in :attr:`Folds.names` order."""
    worst_margin: float
    """The smallest over folds of :func:`margin`."""


def make_folds(
    labels: np.ndarray, categories: list[str | None], seed: int = 0, k: int = 5
) -> Folds:
    """Leave-one-category-out folds when at least two categories hold label-1 rows, else k-fold."""
    harm = sorted({c for c, y in zip(categories, labels, strict=True) if c is not None and y == 1})
    if len(harm) >= 2:
        fold_of = {c: i for i, c in enumerate(harm)}
        others = sorted({c for c in categories if c is not None and c not in fold_of})
        fold_of.update({c: i % len(harm) for i, c in enumerate(others)})
        assign = np.array(
            [fold_of[c] if c is not None else i % len(harm) for i, c in enumerate(categories)]
        )
        return Folds("category", harm, [np.flatnonzero(assign == f) for f in range(len(harm))])
    rng = np.random.default_rng(seed)
    assign = np.zeros(len(labels), dtype=np.int64)
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == label))
        assign[idx] = np.arange(len(idx)) % k
    return Folds(
        "kfold",
        [f"fold {i + 1}" for i in range(k)],
        [np.flatnonzero(assign == f) for f in range(k)],
    )


def aggregations(alpha: float = 0.5, window: int = 4) -> list[AggregationSpec]:
    """The aggregation candidates: none, EMA(``alpha``), window mean(``window``)."""
    return [
        AggregationSpec("none", alpha, window),
        AggregationSpec("ema", alpha, window),
        AggregationSpec("window", alpha, window),
    ]


def fit_candidate(
    acts: Activations,
    hazard: np.ndarray,
    layer: int,
    method: Method,
    labels: TokenLabels,
    *,
    l2: float,
    pooling: Pooling = "token",
    name: str = "probe",
) -> ProbeMonitor:
    """Fit ``method`` at ``layer`` on ``acts`` with token labels ``labels`` (``hazard``: per row)."""
    if pooling == "token":
        idx, y = token_selection(acts.row, acts.labels, hazard, labels)
        x = acts.hidden[layer][torch.from_numpy(idx)]
    else:
        x, y = acts.pooled(layer, pooling), acts.labels
    p = fit(x, torch.from_numpy(np.asarray(y)), method, l2=l2)
    return ProbeMonitor(name, layer, p.direction, p.bias, mean=p.mean, std=p.std)


def cross_validate(
    acts: Activations,
    hazard: np.ndarray,
    folds: Folds,
    *,
    layers: list[int],
    methods: list[Method],
    labels: list[TokenLabels],
    aggs: list[AggregationSpec],
    calibration: Activations | None,
    target_fpr: float,
    confidence: float,
    l2: float,
    pooling: Pooling = "token",
    progress: bool = True,
) -> list[Score]:
    """Score every candidate on every fold (see the module docstring); one fit per fold, layer,
    method and labels, shared by the aggregations."""
    per: dict[Candidate, list[dict[str, float]]] = {}
    total = len(folds.heldout) * len(layers) * len(methods) * len(labels)
    done = 0
    for f, held in enumerate(folds.heldout):
        train_rows = folds.train(f, acts.n_rows)
        tr, te = acts.select(train_rows), acts.select(held)
        cal = calibration if calibration is not None else tr.select(np.flatnonzero(tr.labels == 0))
        for layer in layers:
            for method in methods:
                for lab in labels:
                    mon = fit_candidate(
                        tr, hazard[train_rows], layer, method, lab, l2=l2, pooling=pooling
                    )
                    te_tok = mon.score_tensor(te.hidden[layer]).numpy()
                    cal_tok = mon.score_tensor(cal.hidden[layer]).numpy()
                    for agg in aggs:
                        per.setdefault(Candidate(layer, method, lab, agg), []).append(
                            _fold_scores(te, te_tok, cal, cal_tok, agg, target_fpr, confidence)
                        )
                    done += 1
                    if progress:
                        print(
                            f"\rcross-validation: {done}/{total} fits",
                            end="",
                            file=sys.stderr,
                            flush=True,
                        )
    if progress:
        print(file=sys.stderr)
    return [_summarise(c, rows) for c, rows in per.items()]


def _fold_scores(
    te: Activations,
    te_tok: np.ndarray,
    cal: Activations,
    cal_tok: np.ndarray,
    agg: AggregationSpec,
    target_fpr: float,
    confidence: float,
) -> dict[str, float]:
    te_rows = M.row_max_scores(te_tok, te.row, te.n_rows, agg)
    cal_rows = M.row_max_scores(cal_tok, cal.row, cal.n_rows, agg)
    threshold = M.threshold_at_fpr_bound(cal_rows, target_fpr, confidence).threshold
    pos, neg = te.labels == 1, te.labels == 0
    nan = float("nan")
    return {
        "margin": margin(te_rows[pos], cal_rows, threshold) if pos.any() else nan,
        "tpr": float((te_rows[pos] > threshold).mean()) if pos.any() else nan,
        "strict_tpr": float((te_rows[pos] > cal_rows.max()).mean()) if pos.any() else nan,
        "fpr": float((te_rows[neg] > threshold).mean()) if neg.any() else nan,
        "auroc": M.auroc(te_rows, te.labels),
        "token_auroc": M.auroc(te_tok, te.token_labels()),
    }


MARGIN_QUANTILE = 0.1
"""Quantile of a held-out category's positive rows that :func:`margin` measures."""


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def margin(pos_rows: np.ndarray, cal_rows: np.ndarray, threshold: float) -> float:
    """How far above the threshold a held-out category's unsafe answers sit, in units of the benign
    answers' upper spread: ``(q - t) / (t - m)`` in logits, where ``q`` is the
    :data:`MARGIN_QUANTILE` quantile of the positive rows' scores, ``t`` the threshold and ``m`` the
    calibration answers' median. Scale-free (the same for any affine rescaling of the logit), so
    methods and layers compare; larger means the category's answers would still be caught after a
    shift as large as the benign answers' own spread. ``nan`` when ``t <= m``."""
    t = float(_logit(np.array([threshold]))[0])
    m = float(np.median(_logit(cal_rows)))
    if not t > m:
        return float("nan")
    q = float(np.quantile(_logit(pos_rows), MARGIN_QUANTILE))
    return (q - t) / (t - m)


def _nanmean(v: list[float]) -> float:
    v = [x for x in v if x == x]
    return float(np.mean(v)) if v else float("nan")


def _summarise(c: Candidate, rows: list[dict[str, float]]) -> Score:
    tprs = [r["tpr"] for r in rows]
    finite = [t for t in tprs if t == t]
    return Score(
        c,
        _nanmean(tprs),
        _nanmean([r["strict_tpr"] for r in rows]),
        min(finite) if finite else float("nan"),
        _nanmean([r["auroc"] for r in rows]),
        _nanmean([r["fpr"] for r in rows]),
        _nanmean([r["token_auroc"] for r in rows]),
        tprs,
        _nanmin([r["margin"] for r in rows]),
    )


def _nanmin(v: list[float]) -> float:
    v = [x for x in v if x == x]
    return float(min(v)) if v else float("nan")


_AGG_ORDER = {"none": 0, "ema": 1, "window": 2}
_METHOD_ORDER = {"logreg": 0, "diffmean": 1}


def rank_key(s: Score, num_layers: int) -> tuple:
    """Sort key of the criterion (larger is better); see the module docstring."""

    def hi(v: float) -> float:
        return -1.0 if v != v else v

    c = s.candidate

    def lo(v: float) -> float:
        return -np.inf if v != v else v

    return (
        hi(s.worst_tpr),
        hi(s.tpr),
        lo(s.worst_margin),
        hi(s.strict_tpr),
        hi(s.auroc),
        -(s.fpr if s.fpr == s.fpr else 1.0),
        hi(s.token_auroc),
        -TOKEN_LABELS.index(c.labels),
        -_AGG_ORDER[c.aggregation.kind],
        -_METHOD_ORDER[c.method],
        -abs(c.layer - (num_layers - 1) / 2),
    )


def ranked(scores: list[Score], num_layers: int) -> list[Score]:
    """``scores`` best first by :func:`rank_key`."""
    return sorted(scores, key=lambda s: rank_key(s, num_layers), reverse=True)


def describe(c: Candidate) -> str:
    agg = c.aggregation
    a = {"none": "none", "ema": f"ema({agg.alpha:g})", "window": f"window({agg.window})"}[agg.kind]
    return f"layer {c.layer}, {c.method}, labels {c.labels}, aggregation {a}"


def score_to_dict(s: Score) -> dict:
    c = s.candidate
    return {
        "layer": c.layer,
        "method": c.method,
        "labels": c.labels,
        "aggregation": {
            "kind": c.aggregation.kind,
            "alpha": c.aggregation.alpha,
            "window": c.aggregation.window,
        },
        "cv_tpr": s.tpr,
        "cv_strict_tpr": s.strict_tpr,
        "cv_worst_tpr": s.worst_tpr,
        "cv_auroc": s.auroc,
        "cv_fpr": s.fpr,
        "cv_token_auroc": s.token_auroc,
        "fold_tpr": s.fold_tpr,
        "cv_worst_margin": s.worst_margin,
    }
