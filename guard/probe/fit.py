"""Fitting a linear direction to labelled token activations (torch, full batch, deterministic).

- ``logreg``: L2-regularised logistic regression on standardised activations, full-batch LBFGS,
  classes weighted to equal total mass so the token imbalance between classes does not move the
  bias. The probe keeps the standardisation (``mean``, ``std``).
- ``diffmean``: ``u = unit(mu_pos - mu_neg)`` in raw activation space (Arditi et al.), then a 1-D
  logistic fit of scale and bias on ``u . h`` so the score is a calibrated probability. No
  standardisation is stored; the steering vector is ``u`` itself.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Method = Literal["logreg", "diffmean"]
STD_FLOOR = 1e-4
"""Lower bound on a feature's std, so a constant feature cannot blow up its standardised value."""


class LinearProbe(NamedTuple):
    """``score(h) = sigmoid(direction . ((h - mean) / std) + bias)``."""

    direction: torch.Tensor
    """``[d]`` weights in standardised space (raw space when ``mean`` is ``None``)."""
    bias: float
    mean: torch.Tensor | None
    """``[d]`` training mean, or ``None`` for no standardisation."""
    std: torch.Tensor | None
    """``[d]`` training std (floored at :data:`STD_FLOOR`), or ``None``."""


def fit(
    x: torch.Tensor,
    y: torch.Tensor,
    method: Method = "logreg",
    *,
    l2: float = 0.1,
    max_iter: int = 200,
) -> LinearProbe:
    """Fit ``x`` ``[n, d]`` to binary labels ``y`` ``[n]`` with ``method``."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x [n, d] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.float()
    if not (0 < float(y.sum()) < len(y)):
        raise ValueError("probe training needs tokens of both labels")
    if method == "logreg":
        return fit_logreg(x, y, l2=l2, max_iter=max_iter)
    if method == "diffmean":
        return fit_diffmean(x, y, max_iter=max_iter)
    raise ValueError(f"unknown probe method {method!r} (logreg or diffmean)")


def fit_logreg(
    x: torch.Tensor, y: torch.Tensor, *, l2: float = 0.1, max_iter: int = 200
) -> LinearProbe:
    mean = x.mean(0)
    std = x.std(0).clamp_min(STD_FLOOR)
    z = (x - mean) / std
    w, b = _logistic(z, y, l2=l2, max_iter=max_iter)
    return LinearProbe(w, b, mean, std)


def fit_diffmean(x: torch.Tensor, y: torch.Tensor, *, max_iter: int = 200) -> LinearProbe:
    pos = y > 0.5
    diff = x[pos].mean(0) - x[~pos].mean(0)
    u = diff / diff.norm().clamp_min(1e-12)
    proj = (x @ u)[:, None]
    centre, scale = proj.mean(), proj.std().clamp_min(1e-6)
    (a,), c = _logistic((proj - centre) / scale, y, l2=0.0, max_iter=max_iter)
    # sigmoid(a * (u.h - centre) / scale + c)
    return LinearProbe(u * (a / scale), float(c - a * centre / scale), None, None)


def _logistic(
    z: torch.Tensor, y: torch.Tensor, *, l2: float, max_iter: int
) -> tuple[torch.Tensor, float]:
    """Class-balanced logistic regression ``sigmoid(z @ w + b)`` with ``l2/2 * |w|^2``, from zero."""
    z = z.double()
    y = y.double()
    n_pos = y.sum()
    weight = torch.where(y > 0.5, 0.5 / n_pos, 0.5 / (len(y) - n_pos))
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            weight
            * torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none")
        ).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), float(b.detach())
