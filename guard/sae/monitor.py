"""A monitor that watches a few SAE features, computing only those features.

Encoding all ``d_sae`` features costs ``d_in * d_sae`` per token; watching ``k`` of them costs
``d_in * k``. At construction the encoder is sliced to the watched columns and ``b_dec`` is folded
into the bias (``(norm(x) - b_dec) @ W[:, idx] + b[idx] == norm(x) @ W[:, idx] + (b[idx] - b_dec @
W[:, idx])``), so scoring ``n`` tokens is the per-token normalization (O(d)) plus one
``[n, d] @ [d, k]`` product (``[d, 2k]`` for gated SAEs, gate and magnitude paths side by side).

Exactness: relu, jumprelu and gated features depend only on their own pre-activation, so the
sliced features equal the full encoder's (tested). TopK is not: whether feature i is among the
top k of a token depends on every other pre-activation. The monitor therefore applies a
*threshold on the pre-activation* instead, ``f_i = relu(pre_i) * (pre_i > theta)`` (the
BatchTopK -> JumpReLU conversion); ``theta`` comes from ``topk_threshold``, else from the SAE's own
``threshold`` tensor, else 0 (plain ReLU, an upper bound on the TopK activation, logged as a
warning). :func:`calibrate_topk_threshold` estimates ``theta`` from sample activations.

Scores: with each watched feature's activation ``f_i`` and its threshold ``t_i`` (weights
``w_i``), the ratio ``r`` is ``max_i f_i / t_i`` (rule any), ``min_i f_i / t_i`` (all) or
``sum_i w_i f_i / weighted_threshold`` (weighted, clamped at 0), and the per-token score is
``r / (1 + r)`` in [0, 1): exactly 0.5 when the rule is met with equality. With the default
monitor threshold 0.5 and no aggregation, the monitor fires exactly when the rule holds
(``f_i > t_i``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from guard.errors import ModelLoadError
from guard.modelinfo import ModelInfo
from guard.monitors.base import AggregationSpec, Monitor, require_finite
from guard.sae.model import LAYER_NORM_EPS, Sae, present

Rule = Literal["any", "all", "weighted"]
RULES: tuple[str, ...] = ("any", "all", "weighted")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchedFeature:
    """One watched SAE feature."""

    index: int
    """Column of the SAE encoder (0-based)."""
    threshold: float
    """Activation the feature must exceed (rules any/all); its ratio ``f / threshold`` is 1 there."""
    weight: float = 1.0
    """Weight in the weighted rule and in the steering direction."""

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"feature {self.index}: threshold must be > 0, got {self.threshold}")


@dataclass
class _Sliced:
    """The watched part of the encoder, float32 (gated: ``[gate | mag]`` columns side by side).

    ``pre = norm(x) @ W + b`` is computed without materialising ``norm(x)``: every supported
    normalization is a per-token affine map, so it is applied to the ``[n, k]`` product instead
    (constant factors folded into ``W``; layer norm via ``colsum = W.sum(0)``).
    """

    W: Tensor
    b: Tensor
    theta: Tensor | None = None
    """Per-feature pre-activation threshold (jumprelu, topk), clamped at 0 so ``relu`` is implied."""
    colsum: Tensor | None = None
    """``W.sum(0)`` for layer norm: ``(x - mu) @ W == x @ W - mu * colsum``."""

    def to(self, device: torch.device) -> _Sliced:
        return _Sliced(
            self.W.to(device),
            self.b.to(device),
            None if self.theta is None else self.theta.to(device),
            None if self.colsum is None else self.colsum.to(device),
        )


class SaeFeatureMonitor(Monitor):
    """Scores tokens by a rule over a few SAE features read at ``layer``."""

    def __init__(
        self,
        name: str,
        sae: Sae,
        features: Sequence[WatchedFeature | tuple],
        *,
        rule: Rule = "any",
        weighted_threshold: float | None = None,
        layer: int | None = None,
        threshold: float = 0.5,
        aggregation: AggregationSpec | None = None,
        topk_threshold: float | Tensor | None = None,
    ) -> None:
        feats = [f if isinstance(f, WatchedFeature) else WatchedFeature(*f) for f in features]
        if not feats:
            raise ValueError(f"SAE monitor '{name}' watches no features")
        bad = [f.index for f in feats if not 0 <= f.index < sae.d_sae]
        if bad:
            raise ValueError(
                f"SAE monitor '{name}': feature indices {bad} out of range 0..{sae.d_sae - 1}"
            )
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        layer = sae.layer if layer is None else layer
        if layer is None or layer < 0:
            raise ValueError(
                f"SAE monitor '{name}' needs a layer >= 0 (the SAE file names none), got {layer}"
            )
        self.layer: int = int(layer)
        self.name, self.threshold = name, float(threshold)
        self.aggregation = aggregation or AggregationSpec(kind="none")
        self.rule: Rule = rule
        self.features = feats
        # Only the sliced encoder and the steering direction are kept: the full SAE can be GiBs.
        self.activation = sae.activation
        self.normalize, self.norm_scale, self._d_in = sae.normalize, sae.norm_scale, sae.d_in
        self.indices = torch.tensor([f.index for f in feats], dtype=torch.long)
        self.feature_thresholds = torch.tensor([f.threshold for f in feats], dtype=torch.float32)
        self.weights = torch.tensor([f.weight for f in feats], dtype=torch.float32)
        self.weighted_threshold = self._weighted_threshold(weighted_threshold)
        self._sliced = _slice(sae, self.indices, topk_threshold, name)
        steer = self.weights @ sae.W_dec[self.indices].float()
        self._steer = steer / steer.norm().clamp_min(1e-12)
        # Only what scoring and steering read is checked (the full SAE can be GiBs): a NaN there
        # would silently keep the monitor from ever firing.
        s = self._sliced
        for label, t in (
            ("threshold", self.threshold),
            ("feature thresholds", self.feature_thresholds),
            ("feature weights", self.weights),
            ("weighted_threshold", self.weighted_threshold),
            ("the watched encoder columns (W_enc, b_enc, b_dec, gates, norm_scale)", s.W),
            ("the watched encoder bias", s.b),
            ("the watched features' thresholds", s.theta),
            ("the watched decoder rows (steering)", steer),
        ):
            require_finite(f"SAE monitor '{name}': {label}", t)
        self._by_device: dict[torch.device, tuple[_Sliced, Tensor, Tensor]] = {}

    def _weighted_threshold(self, value: float | None) -> float:
        """Defaults to ``sum_i w_i t_i``: the weighted sum when every feature sits at its threshold."""
        if value is None:
            value = float(self.weights @ self.feature_thresholds)
        if not value > 0:
            raise ValueError(
                f"SAE monitor '{self.name}': weighted_threshold must be > 0, got {value}"
            )
        return float(value)

    @property
    def d_model(self) -> int:
        return self._d_in

    # -- scoring ----------------------------------------------------------------------------

    def _on(self, device: torch.device) -> tuple[_Sliced, Tensor, Tensor]:
        cached = self._by_device.get(device)
        if cached is None:
            s = self._sliced
            cached = self._by_device[device] = (
                s.to(device),
                self.feature_thresholds.to(device),
                self.weights.to(device),
            )
        return cached

    def feature_acts(self, hidden: Tensor) -> Tensor:
        """``[n, d]`` activations -> ``[n, k]`` float32 activations of the watched features, in order."""
        if hidden.ndim != 2 or hidden.shape[1] != self.d_model:
            raise ValueError(
                f"SAE monitor '{self.name}' expects [n, {self.d_model}] activations, "
                f"got {list(hidden.shape)}"
            )
        s, _, _ = self._on(hidden.device)
        pre = self._pre(hidden.float(), s)
        if self.activation == "gated":
            gate, mag = pre.chunk(2, dim=-1)
            return torch.relu(mag) * (gate > 0)
        if s.theta is None:
            return torch.relu(pre)
        # relu(pre) * (pre > theta) == where(pre > max(theta, 0), pre, 0)
        return torch.where(pre > s.theta, pre, 0.0)

    def _pre(self, h: Tensor, s: _Sliced) -> Tensor:
        """``norm(h) @ W + b`` (see :class:`_Sliced`): O(d) per token besides the ``d x k`` product."""
        if self.normalize == "constant_norm_rescale":  # sqrt(d) is folded into W
            inv = h.norm(dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_()
            return torch.addcmul(s.b, h @ s.W, inv)
        if self.normalize == "layer_norm":
            std, mu = torch.std_mean(h, dim=-1, keepdim=True)
            colsum = present(s.colsum, "colsum")
            return (
                torch.addcmul(h @ s.W, mu, colsum, value=-1.0).div_(std + LAYER_NORM_EPS).add_(s.b)
            )
        return torch.addmm(s.b, h, s.W)  # none; expected_average_only_in's factor is folded into W

    def ratio(self, hidden: Tensor) -> Tensor:
        """``[n]`` rule ratios: 1 is exactly at threshold, above 1 the rule holds."""
        f = self.feature_acts(hidden)
        _, thr, w = self._on(hidden.device)
        if self.rule == "any":
            return (f / thr).amax(dim=-1)
        if self.rule == "all":
            return (f / thr).amin(dim=-1)
        return ((f @ w) / self.weighted_threshold).clamp_min(0.0)

    def score_tensor(self, hidden: Tensor) -> Tensor:
        """``[n, d]`` -> ``[n]`` float64 scores ``r / (1 + r)`` in [0, 1)."""
        r = self.ratio(hidden).double()
        return r / (1.0 + r)

    def score(self, hidden: Tensor | None, token_ids: list[int]) -> list[float]:
        if hidden is None:
            raise ValueError(f"SAE monitor '{self.name}' needs layer {self.layer} activations")
        if hidden.shape[0] != len(token_ids):
            raise ValueError(f"{hidden.shape[0]} activations for {len(token_ids)} tokens")
        return self.score_tensor(hidden).tolist()

    def steering_vector(self) -> Tensor:
        """Unit vector along ``sum_i w_i W_dec[idx_i]``, the watched features' decoder directions."""
        return self._steer

    # -- compatibility ----------------------------------------------------------------------

    def check_compatible(self, info: ModelInfo) -> None:
        """Raise :class:`ModelLoadError` unless the SAE can read ``info``'s model at ``layer``."""
        if info.d_model != self.d_model:
            raise ModelLoadError(
                f"SAE monitor '{self.name}' reads {self.d_model}-dim activations but model "
                f"'{info.name}' has d_model {info.d_model}; this SAE was trained on another model"
            )
        if self.layer >= info.num_layers:
            raise ModelLoadError(
                f"SAE monitor '{self.name}' reads layer {self.layer} but model '{info.name}' has "
                f"{info.num_layers} layers (0..{info.num_layers - 1})"
            )


def _slice(sae: Sae, idx: Tensor, topk_threshold: float | Tensor | None, name: str) -> _Sliced:
    """The watched columns of the encoder with ``b_dec`` folded into the bias (float32 copies of size d*k)."""
    W = sae.W_enc[:, idx].float()
    b_dec = sae.b_dec.float()
    if sae.activation == "gated":
        W_mag = W * present(sae.r_mag, "r_mag")[idx].float().exp()
        W = torch.cat([W, W_mag], dim=1)
        b = torch.cat(
            [present(sae.b_gate, "b_gate")[idx].float(), present(sae.b_mag, "b_mag")[idx].float()]
        )
    else:
        b = sae.b_enc[idx].float()
    if sae.apply_b_dec_to_input:  # b_dec is subtracted after normalizing, so with the unscaled W
        b = b - b_dec @ W
    colsum = W.sum(dim=0) if sae.normalize == "layer_norm" else None
    if sae.normalize == "constant_norm_rescale":
        W = W * math.sqrt(sae.d_in)
    elif sae.normalize == "expected_average_only_in":
        W = W * present(sae.norm_scale, "norm_scale")
    theta = None
    if sae.activation == "jumprelu":
        theta = present(sae.threshold, "threshold")[idx].float().clamp_min(0.0)
    elif sae.activation == "topk":
        theta = _topk_theta(sae, idx, topk_threshold, name).clamp_min(0.0)
    return _Sliced(W.contiguous(), b.contiguous(), theta, colsum)


def _topk_theta(sae: Sae, idx: Tensor, given: float | Tensor | None, name: str) -> Tensor:
    if given is not None:
        t = torch.as_tensor(given, dtype=torch.float32)
        if t.ndim == 0:
            return t.expand(len(idx)).clone()
        if tuple(t.shape) != (sae.d_sae,):
            raise ValueError(
                f"topk_threshold must be a number or a [{sae.d_sae}] tensor, got {list(t.shape)}"
            )
        return t[idx]
    if sae.threshold is not None:
        return sae.threshold[idx].float()
    log.warning(
        "SAE monitor '%s': TopK SAE without a calibrated pre-activation threshold; scoring the watched "
        "features as ReLU (an upper bound: they may count as active when they would not be in the "
        "top %d). Calibrate one with guard.sae.monitor.calibrate_topk_threshold.",
        name,
        sae.k,
    )
    return torch.zeros(len(idx))


@torch.no_grad()
def calibrate_topk_threshold(sae: Sae, hidden: Tensor, *, batch: int = 256) -> float:
    """One pre-activation threshold for a TopK SAE (the BatchTopK -> JumpReLU conversion).

    The mean over the sample tokens of each token's k-th largest ``relu(pre)``: the level a
    feature's pre-activation typically has to clear to enter the top k. Costs full encodes of
    ``hidden`` (``[n, d_in]`` sample activations), once, offline.
    """
    if sae.activation != "topk":
        raise ValueError(f"calibrate_topk_threshold needs a topk SAE, got {sae.activation}")
    kth = [
        torch.relu(sae.pre_activation(chunk))
        .float()
        .topk(present(sae.k, "k"), dim=-1)
        .values[:, -1]
        for chunk in hidden.split(batch)
    ]
    return float(torch.cat(kth).mean())
