"""Probe training: split, layer sweep, fit, row-level evaluation, threshold calibration.

Invariants of :func:`train_probe`:

- Rows (not tokens) are split into train / held-out, seeded and stratified by label, so no text
  of a held-out row is ever trained on. Reviewed rows (``"source": "review"``, from
  :func:`guard.loop.export_labelled`) are always in the train split: they are the corrections
  the new probe must learn; their negatives (false positives) also join threshold calibration.
- The saved probe is the one fitted on the train split, so the held-out metrics in probe.json
  describe exactly the saved direction.
- All metrics are row level on the monitor's own decision statistic: the maximum over a
  completion of the aggregated per-token score (see :func:`guard.probe.metrics.row_max_scores`).
- Layer choice uses the held-out split only; ``--eval`` data is reported, never used to choose.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from guard.engine.base import Engine
from guard.errors import InvalidRequestError
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor, config_fingerprint
from guard.probe import metrics as M
from guard.probe.cache import ActivationCache
from guard.probe.collect import Activations, Pooling, Span, collect
from guard.probe.data import DataError, read_files
from guard.probe.fit import Method, fit


@dataclass
class TrainConfig:
    """Everything that decides a probe besides its data and model."""

    method: Method = "logreg"
    """``logreg`` (standardised logistic regression) or ``diffmean`` (difference of means)."""
    l2: float = 0.1
    """L2 penalty of ``logreg`` (on the mean class-balanced loss)."""
    target_fpr: float = 0.01
    """Row-level false-positive rate the threshold is calibrated for."""
    heldout_frac: float = 0.2
    """Fraction of rows of each label held out for evaluation and layer choice."""
    seed: int = 0
    """Seed of the train / held-out split."""
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    """Aggregation stored with the probe and used by every row-level metric."""
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
            raise DataError(f"need at least 2 rows with label {label} to split train/held-out, found {len(idx)}")
        idx = rng.permutation(idx)
        n_held = min(max(1, int(round(heldout_frac * len(idx)))), len(idx) - 1)
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def row_scores(monitor: ProbeMonitor, acts: Activations, aggregation: AggregationSpec | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(per-token scores, per-row max aggregated scores) of ``monitor`` on ``acts``."""
    tok = monitor.score_tensor(acts.hidden[monitor.layer]).numpy()
    return tok, M.row_max_scores(tok, acts.row, acts.n_rows, aggregation or monitor.aggregation)


def evaluate(monitor: ProbeMonitor, acts: Activations, target_fpr: float = 0.01) -> dict[str, Any]:
    """Row-level AUROC, TPR at ``target_fpr`` (threshold from these negatives), token AUROC, and TPR/FPR
    at the monitor's own threshold."""
    tok, rows = row_scores(monitor, acts)
    tpr, fpr = M.rates_at(rows, acts.labels, monitor.threshold)
    return {"rows": int(acts.n_rows), "positives": int(acts.labels.sum()),
            "negatives": int((acts.labels == 0).sum()), "auroc": M.auroc(rows, acts.labels),
            "tpr_at_target_fpr": M.tpr_at_fpr(rows, acts.labels, target_fpr), "target_fpr": target_fpr,
            "token_auroc": M.auroc(tok, acts.token_labels()), "threshold": monitor.threshold,
            "tpr_at_threshold": tpr, "fpr_at_threshold": fpr}


def fit_layer(acts: Activations, layer: int, config: TrainConfig, name: str = "probe") -> ProbeMonitor:
    if config.pooling == "token":
        x, y = acts.hidden[layer], torch.from_numpy(acts.token_labels())
    else:
        x, y = acts.pooled(layer, config.pooling), torch.from_numpy(acts.labels)
    p = fit(x, y, config.method, l2=config.l2)
    return ProbeMonitor(name, layer, p.direction, p.bias, mean=p.mean, std=p.std, aggregation=config.aggregation)


def sweep_layers(train: Activations, heldout: Activations, layers: list[int], config: TrainConfig,
                 eval_acts: Activations | None = None) -> list[LayerResult]:
    out = []
    for layer in layers:
        mon = fit_layer(train, layer, config)
        out.append(LayerResult(layer, mon, evaluate(mon, heldout, config.target_fpr),
                               evaluate(mon, eval_acts, config.target_fpr) if eval_acts is not None else None))
    return out


def best_layer(results: list[LayerResult], num_layers: int) -> LayerResult:
    """Highest held-out row AUROC, then TPR at the target FPR.

    Easy data saturates both (AUROC 1.0 at every layer), so ties go to the higher held-out
    *token* AUROC, which saturates later, and then to the layer nearest mid-depth, where probes
    usually generalise best.
    """
    def key(r: LayerResult):
        h = r.heldout
        return (_nan_low(h["auroc"]), _nan_low(h["tpr_at_target_fpr"]), _nan_low(h["token_auroc"]),
                -abs(r.layer - (num_layers - 1) / 2))
    return max(results, key=key)


def _nan_low(v: float) -> float:
    return -1.0 if v != v else v


def train_probe(engine: Engine, data: list[str | Path], *, model_dir: str | Path | None = None,
                layers: list[int] | None = None, eval_data: list[str | Path] = (),
                calibration: list[str | Path] = (), config: TrainConfig | None = None,
                name: str = "probe", progress: bool = True, cache: ActivationCache | None = None) -> TrainResult:
    """Train a probe on ``data`` (JSONL paths). ``layers=None`` sweeps every layer.

    With ``cache``, activations seen before (same model, rows, layers) are read from disk.

    Numbered phases: (1) read data, (2) collect activations once for all layers, (3) split rows,
    (4) fit and evaluate per layer, (5) pick the best layer, (6) calibrate its threshold on negative
    rows, (7) evaluate at that threshold and assemble probe.json metadata.
    """
    config = config or TrainConfig()
    # 1. data
    examples = read_files(list(data))
    eval_examples = read_files(list(eval_data)) if eval_data else []
    calib_examples = read_files(list(calibration)) if calibration else []
    layers = sorted(set(layers)) if layers else list(range(engine.info.num_layers))
    bad = [l for l in layers if not 0 <= l < engine.info.num_layers]
    if bad:
        raise InvalidRequestError(f"layers {bad} out of range: the model has {engine.info.num_layers} layers "
                                  f"(0..{engine.info.num_layers - 1})", param="layer")
    # 2. activations, every layer in one pass
    acts = collect(engine, examples, layers, desc="train data", progress=progress, cache=cache, span=config.span)
    eval_acts = (collect(engine, eval_examples, layers, desc="eval data", progress=progress, cache=cache,
                         span=config.span)
                 if eval_examples else None)
    # 3. split; reviewed rows are always trained on
    reviewed = np.array([ex.reviewed for ex in examples], dtype=bool)
    original = np.flatnonzero(~reviewed)
    train_idx, held_idx = split_rows(acts.labels[original], config.heldout_frac, config.seed)
    train_idx = np.sort(np.concatenate([original[train_idx], np.flatnonzero(reviewed)]))
    held_idx = original[held_idx]
    train, heldout = acts.select(train_idx), acts.select(held_idx)
    # 4-5. sweep and choose
    results = sweep_layers(train, heldout, layers, config, eval_acts)
    best = best_layer(results, engine.info.num_layers)
    monitor = best.monitor
    monitor.name = name
    # 6. calibrate on negative rows (reviewed false positives among them)
    if calib_examples:
        negatives = collect(engine, [e for e in calib_examples if e.label == 0], [best.layer],
                            desc="calibration data", progress=progress, cache=cache, span=config.span)
        source = [str(p) for p in calibration]
        reviewed_neg = np.flatnonzero(reviewed & (acts.labels == 0))
        if len(reviewed_neg):
            negatives = _stack([negatives, acts.select(reviewed_neg)], best.layer)
            source.append(f"{len(reviewed_neg)} reviewed negatives of --data")
    else:
        negatives, source = acts.select(np.flatnonzero(acts.labels == 0)), "train+heldout"
    calibration_info = {"source": source, **calibrate(monitor, negatives, config.target_fpr)}
    # 7. final metrics and provenance
    metrics = {"heldout": evaluate(monitor, heldout, config.target_fpr),
               "eval": evaluate(monitor, eval_acts, config.target_fpr) if eval_acts is not None else None,
               "calibration": calibration_info, "sweep": [_sweep_row(r) for r in results]}
    training = {"data": _file_info(data), "eval_data": _file_info(eval_data),
                "calibration_data": _file_info(calibration), "rows": acts.n_rows, "train_rows": int(len(train_idx)),
                "heldout_rows": int(len(held_idx)), "reviewed_rows": int(reviewed.sum()),
                "train_tokens": int(len(train.row)), "seed": config.seed,
                "heldout_frac": config.heldout_frac, "l2": config.l2 if config.method == "logreg" else None,
                "layers_swept": layers, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    monitor.meta = _json_safe({"model": _model_info(engine, model_dir), "method": config.method,
                               "pooling": config.pooling, "span": config.span,
                               "target_fpr": config.target_fpr, "metrics": metrics, "training": training})
    return TrainResult(monitor, results)


def _stack(parts: list[Activations], layer: int) -> Activations:
    """The rows of ``parts`` one after another, at ``layer`` only."""
    offsets = np.cumsum([0] + [p.n_rows for p in parts])
    return Activations({layer: torch.cat([p.hidden[layer] for p in parts])},
                       np.concatenate([p.row + o for p, o in zip(parts, offsets)]),
                       np.concatenate([p.labels for p in parts]))


def decisions(monitor: ProbeMonitor, acts: Activations) -> dict[str, Any]:
    """What ``monitor`` decides on each row at its own threshold and aggregation: positives caught,
    negatives fired on (false positives), and row AUROC (``nan`` with one class)."""
    _, rows = row_scores(monitor, acts)
    fired, pos = rows > monitor.threshold, acts.labels == 1
    return {"rows": int(acts.n_rows), "positives": int(pos.sum()), "caught": int((fired & pos).sum()),
            "negatives": int((~pos).sum()), "false_positives": int((fired & ~pos).sum()),
            "auroc": M.auroc(rows, acts.labels), "threshold": monitor.threshold}


CALIBRATION_MARGIN = 1e-3
"""Logit units by which the threshold clears the boundary negative's score. The threshold is that
row's score, and the row must not fire (``score > threshold``) when its score is computed again on
another path (token-by-token decoding, other batch shapes), which differs in the last digits."""


def calibrate(monitor: ProbeMonitor, negatives: Activations, target_fpr: float) -> dict[str, Any]:
    """Set ``monitor.threshold`` so at most ``target_fpr`` of the ``negatives`` rows fire (with the
    :data:`CALIBRATION_MARGIN` above the boundary row); report the rate."""
    if negatives.n_rows == 0 or negatives.labels.any():
        raise DataError("threshold calibration needs negative (label 0) rows only, and at least one")
    _, rows = row_scores(monitor, negatives)
    t = M.threshold_at_fpr(rows, target_fpr)
    if 0.0 < t < 1.0:
        t = float(1.0 / (1.0 + np.exp(-(np.log(t / (1.0 - t)) + CALIBRATION_MARGIN))))
    monitor.threshold = t
    return {"negatives": int(negatives.n_rows), "fpr_at_threshold": float(np.mean(rows > monitor.threshold))}


def _sweep_row(r: LayerResult) -> dict[str, Any]:
    return {"layer": r.layer, "heldout_auroc": r.heldout["auroc"],
            "heldout_tpr_at_target_fpr": r.heldout["tpr_at_target_fpr"],
            "heldout_token_auroc": r.heldout["token_auroc"],
            "eval_auroc": r.eval["auroc"] if r.eval else None,
            "eval_tpr_at_target_fpr": r.eval["tpr_at_target_fpr"] if r.eval else None}


def _model_info(engine: Engine, model_dir: str | Path | None) -> dict[str, Any]:
    info = engine.info
    return {"name": info.name, "path": str(model_dir) if model_dir else None,
            "config_sha256": config_fingerprint(model_dir) if model_dir else None,
            "num_layers": info.num_layers, "d_model": info.d_model}


def _file_info(paths) -> list[dict[str, Any]]:
    return [{"path": str(p), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()} for p in paths]


def _json_safe(obj):
    """NaN (a metric with one class missing) becomes ``null`` so probe.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
