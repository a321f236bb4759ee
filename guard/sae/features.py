"""Finding the SAE features worth watching: rank by separation, show examples, write a monitor stanza.

Invariants:

- Feature activations are computed exactly as :class:`guard.sae.monitor.SaeFeatureMonitor` computes
  them at serving time (:func:`monitor_feature_acts`): the SAE's own encoder for relu, jumprelu and
  gated SAEs, and for TopK SAEs ``relu(pre) * (pre > theta)`` with ``theta`` the file's threshold
  or 0, because a monitor watching a few features cannot know the top k. So a threshold found here
  means the same thing in a policy.
- The decision statistic of a row is the maximum over its completion tokens, which is when an SAE
  monitor with rule ``any`` and no aggregation fires; AUROC, rates and thresholds all use it.
- Thresholds of a stanza are calibrated *jointly*: rule ``any`` fires when any feature fires, so the
  per-feature thresholds are raised together until the union fires on at most ``target_fpr`` of
  the negative rows.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from torch import Tensor

from guard.probe import metrics as M
from guard.probe.collect import Activations
from guard.sae.model import Sae

MIN_THRESHOLD = 1e-6
"""Policies need thresholds > 0; a feature silent on every negative fires at any positive activation."""


class FeatureRank(NamedTuple):
    """How well one feature separates label 1 rows from label 0 rows."""

    index: int  # type: ignore[assignment]  # shadows tuple.index; renaming changes the features file
    auroc: float
    """Row-level AUROC of the per-row max activation."""
    mean_pos: float
    """Mean per-row max activation over label 1 rows."""
    mean_neg: float
    """Mean per-row max activation over label 0 rows."""
    firing_rate: float
    """Fraction of completion tokens (all rows) on which the feature is active."""


@torch.no_grad()
def monitor_feature_acts(sae: Sae, x: Tensor) -> Tensor:
    """``[n, d_in]`` -> ``[n, d_sae]`` activations as a feature monitor sees them (see module docstring)."""
    if sae.activation != "topk":
        return sae.encode(x).float()
    pre = sae.pre_activation(x).float()
    theta = sae.threshold.float() if sae.threshold is not None else torch.zeros(())
    return torch.relu(pre) * (pre > theta)


@torch.no_grad()
def row_max_acts(
    sae: Sae, acts: Activations, layer: int, *, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """``([n_rows, d_sae] max activation over each row's completion tokens, [d_sae] token firing rate)``."""
    acts = acts.completion_only()
    h = acts.hidden[layer]
    row = torch.from_numpy(acts.row)
    out = torch.zeros(acts.n_rows, sae.d_sae)
    fired = torch.zeros(sae.d_sae)
    for i in range(0, len(h), chunk):
        f = monitor_feature_acts(sae, h[i : i + chunk])
        out.scatter_reduce_(0, row[i : i + chunk, None].expand_as(f), f, "amax")
        fired += (f > 0).float().sum(0)
    return out.numpy(), (fired / max(1, len(h))).numpy()


def rank_features(
    row_max: np.ndarray, labels: np.ndarray, firing_rate: np.ndarray
) -> list[FeatureRank]:
    """Every feature, best separating first (AUROC, then mean positive activation)."""
    labels = np.asarray(labels).astype(bool)
    out = [
        FeatureRank(
            i,
            M.auroc(row_max[:, i], labels),
            float(row_max[labels, i].mean()),
            float(row_max[~labels, i].mean()),
            float(firing_rate[i]),
        )
        for i in range(row_max.shape[1])
    ]
    return sorted(out, key=lambda r: (-np.nan_to_num(r.auroc, nan=-1.0), -r.mean_pos, r.index))


def joint_thresholds(neg: np.ndarray, target_fpr: float) -> tuple[np.ndarray, float]:
    """Per-feature thresholds (``neg`` is ``[n_neg, m]`` row maxima) whose union fires on at most
    ``target_fpr`` of the rows; returns ``(thresholds, achieved FPR)``.

    Each feature's threshold is its ``j``-th largest negative value for one common ``j``, the largest
    ``j`` that keeps the union within the target (``j = 0``: the maximum, union FPR 0).
    """
    if len(neg) == 0:
        raise ValueError("threshold calibration needs at least one negative row")
    desc = -np.sort(-neg, axis=0)
    for j in range(int(np.floor(target_fpr * len(neg) + 1e-9)), -1, -1):
        thr = np.maximum(desc[j], MIN_THRESHOLD)
        fpr = float((neg > thr).any(axis=1).mean())
        if fpr <= target_fpr:
            return thr, fpr
    raise AssertionError("unreachable: j = 0 fires on no negative")


def any_rule_scores(row_max: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per row ``max_i f_i / t_i``: above 1 exactly when the rule ``any`` fires (the monitor's ratio)."""
    return (row_max / thresholds).max(axis=1)


def stanza(
    name: str,
    sae_path: str | Path,
    layer: int,
    features: list[int],
    thresholds: np.ndarray,
    *,
    relative_to: str | Path | None = None,
) -> dict[str, Any]:
    """A policy monitor entry (``kind: sae``, rule ``any``). ``path`` is made relative to
    ``relative_to`` (the directory the policy will live in) when given."""
    path = str(sae_path)
    if relative_to is not None:
        path = os.path.relpath(Path(sae_path).resolve(), Path(relative_to).resolve())
    return {
        "name": name,
        "kind": "sae",
        "path": path,
        "layer": int(layer),
        "features": [
            {"index": int(i), "threshold": float(f"{t:.6g}")}
            for i, t in zip(features, thresholds, strict=True)
        ],
        "rule": "any",
    }


def stanza_yaml(entry: dict[str, Any], comment: str = "") -> str:
    """The entry as a one-item YAML list, ready to paste under ``monitors:``."""
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    return head + yaml.safe_dump([entry], sort_keys=False, default_flow_style=None)


class Example(NamedTuple):
    row: int
    label: int
    activation: float
    text: str
    """Tokens around the maximum, the maximum one marked ``[[...]]``."""


@torch.no_grad()
def top_examples(
    sae: Sae,
    acts: Activations,
    layer: int,
    feature: int,
    token_text,
    *,
    n: int = 5,
    window: int = 8,
) -> list[Example]:
    """The ``n`` rows where ``feature`` peaks highest, each shown around its peak token.

    ``token_text(id) -> str`` renders one token; ``acts`` must carry token ids.
    """
    acts = acts.completion_only()
    if acts.token_ids is None:
        raise ValueError("top_examples needs activations collected with token ids")
    col = torch.cat(
        [monitor_feature_acts(sae, h)[:, feature] for h in acts.hidden[layer].split(4096)]
    ).numpy()
    bounds = np.searchsorted(acts.row, np.arange(acts.n_rows + 1))
    peaks = [
        (float(col[a:b].max()), r, a + int(col[a:b].argmax()))
        for r, (a, b) in enumerate(itertools.pairwise(bounds))
        if b > a
    ]
    peaks.sort(key=lambda p: (-p[0], p[1]))
    out = []
    for value, r, pos in peaks[:n]:
        if value <= 0:
            break
        lo, hi = max(bounds[r], pos - window), min(bounds[r + 1], pos + window + 1)
        parts = [token_text(int(t)) for t in acts.token_ids[lo:hi]]
        parts[pos - lo] = f"[[{parts[pos - lo]}]]"
        out.append(Example(r, int(acts.labels[r]), value, "".join(parts).replace("\n", " ")))
    return out
