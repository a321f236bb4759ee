"""Detection metrics, in numpy, with the monitor's own decision rule.

The monitor fires when an aggregated score is *strictly* greater than the threshold, so a row is
flagged when ``max_t agg_t > threshold``. :func:`threshold_at_fpr` picks the threshold that keeps
the fraction of negatives above it at or below the target; :func:`tpr_at_fpr` uses the same rule,
so a reported "TPR at 1% FPR" is what a deployed probe with that threshold would achieve.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from guard.monitors.base import AggregationSpec


def auroc(scores, labels) -> float:
    """Area under the ROC curve (the Mann-Whitney U statistic; ties count one half).

    NaN when one class is missing.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # first index of each run of equal values, and the run's end
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def threshold_at_fpr(neg_scores, target_fpr: float) -> float:
    """The smallest observed negative score ``t`` with ``mean(neg > t) <= target_fpr``.

    This is the (1 - target_fpr) quantile of the negatives, rounded so the empirical FPR never
    exceeds the target (with fewer than ``1 / target_fpr`` negatives it is their maximum).
    """
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64))[::-1]
    if len(neg) == 0:
        raise ValueError("threshold calibration needs at least one negative example")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    k = int(np.floor(target_fpr * len(neg) + 1e-9))
    return float(neg[k])


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)`` (exact sum in log space)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in i])
    terms = logc + i * math.log(p) + (n - i) * math.log1p(-p)
    return float(min(1.0, np.exp(terms).sum()))


def fpr_upper_bound(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen ``k`` times in ``n`` trials: the largest
    ``p`` with ``P(Binomial(n, p) <= k) >= 1 - confidence`` (1.0 when ``k >= n``).

    For a threshold at the order statistic of ``n`` exchangeable negatives with ``k`` above it, the
    true false-positive rate exceeds this bound with probability at most ``1 - confidence``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if k >= n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):  # bisection: binomial_cdf is decreasing in p
        mid = (lo + hi) / 2
        if binomial_cdf(k, n, mid) >= 1.0 - confidence:
            lo = mid
        else:
            hi = mid
    return lo


class BoundedThreshold(NamedTuple):
    """A threshold set on negatives so a confidence bound on the false-positive rate meets a target."""

    threshold: float
    above: int
    """Negatives strictly above the threshold."""
    n: int
    """Negatives calibrated on."""
    fpr_bound: float
    """One-sided Clopper-Pearson upper bound (at the confidence asked) on the false-positive rate of
    the threshold on new negatives from the same distribution."""
    meets_target: bool
    """``fpr_bound <= target``; false when there are too few negatives for any threshold to reach it
    (then the threshold is their maximum, the most the data can say)."""


def threshold_at_fpr_bound(neg_scores, target_fpr: float, confidence: float) -> BoundedThreshold:
    """The smallest observed negative score ``t`` whose false-positive rate on new negatives is at most
    ``target_fpr`` with probability ``confidence`` (split-conformal / Clopper-Pearson).

    With the negatives sorted high to low, ``t = neg[k]`` leaves at most ``k`` negatives above it; the
    true rate ``F(t)`` of such an order statistic exceeds ``target_fpr`` with probability
    ``P(Binomial(n, target_fpr) <= k)``, so ``k`` is the largest with that probability at most
    ``1 - confidence``. When even ``k = 0`` fails (fewer than ``log(1 - confidence) /
    log(1 - target_fpr)`` negatives) the threshold is the maximum negative and ``meets_target`` is
    false. Unlike :func:`threshold_at_fpr` (the empirical quantile, above target about half the
    time on new data), this holds the target with the stated confidence.
    """
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64))[::-1]
    n = len(neg)
    if n == 0:
        raise ValueError("threshold calibration needs at least one negative example")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k = 0
    while k + 1 < n and binomial_cdf(k + 1, n, target_fpr) <= 1.0 - confidence:
        k += 1
    t = float(neg[k])
    above = int((neg > t).sum())
    bound = fpr_upper_bound(above, n, confidence)
    return BoundedThreshold(t, above, n, bound, bound <= target_fpr)


def negatives_needed(target_fpr: float, confidence: float) -> int | None:
    """Fewest negatives with which :func:`threshold_at_fpr_bound` can meet ``target_fpr`` at all
    (``(1 - target_fpr) ** n <= 1 - confidence``); ``None`` for a target of 0, which no finite
    number of negatives bounds. Raises ``ValueError`` outside ``[0, 1)`` and ``(0, 1)``."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    if target_fpr == 0.0:
        return None
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return int(math.ceil(math.log(1.0 - confidence) / math.log1p(-target_fpr) - 1e-9))


def rates_at(scores, labels, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) of the rule ``score > threshold``."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    fired = scores > threshold
    tpr = float(fired[labels].mean()) if labels.any() else float("nan")
    fpr = float(fired[~labels].mean()) if (~labels).any() else float("nan")
    return tpr, fpr


def tpr_at_fpr(scores, labels, target_fpr: float = 0.01) -> float:
    """TPR at the threshold :func:`threshold_at_fpr` picks on these negatives."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        return float("nan")
    return rates_at(scores, labels, threshold_at_fpr(scores[~labels], target_fpr))[0]


def row_max_scores(
    token_scores, row: np.ndarray, n_rows: int, aggregation: AggregationSpec
) -> np.ndarray:
    """Per row, the maximum over its tokens of the aggregated score: the monitor's decision statistic.

    ``row`` must be non-decreasing (each row's tokens contiguous and in order).
    """
    token_scores = np.asarray(token_scores, dtype=np.float64)
    out = np.full(n_rows, -np.inf)
    bounds = np.searchsorted(row, np.arange(n_rows + 1))
    for r in range(n_rows):
        seg = token_scores[bounds[r] : bounds[r + 1]].tolist()
        if seg:
            out[r] = max(aggregation.aggregate(seg))
    return out
