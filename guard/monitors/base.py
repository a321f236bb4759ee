"""The monitor seam.

A monitor is split in two so engines can run the expensive half wherever the activations are
(inside a vLLM worker, say) while the controller keeps the decision state:

- :class:`Monitor` is stateless: ``layer`` names the activation it reads (``None`` for monitors
  that only look at token ids) and :meth:`Monitor.score` maps ``[n, d_model]`` activations of n
  tokens (plus their ids) to ``n`` raw scores, each in [0, 1]. Activation monitors compute them
  in :meth:`Monitor.score_tensor` (pure tensor math), which every engine ends up calling: the
  controller through ``score`` on the transformers engine, vLLM's worker inside the model graph.
- :class:`MonitorState` is per generation: it keeps the raw score of every output token, the
  aggregated score (EMA, window mean or raw) and answers whether the monitor fires. Truncating it
  to a length restores exactly the state it had at that length, which is what a rollback needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch

Aggregation = Literal["none", "ema", "window"]


@dataclass(frozen=True)
class AggregationSpec:
    """How per-token scores become the score compared with the threshold."""

    kind: Aggregation = "ema"
    alpha: float = 0.5
    """EMA weight of the newest token: ``e_t = alpha * s_t + (1 - alpha) * e_{t-1}``, ``e_0 = s_0``."""
    window: int = 4
    """Window length for ``kind="window"`` (mean of the last ``window`` scores)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError("aggregation alpha must be in (0, 1]")
        if self.window < 1:
            raise ValueError("aggregation window must be >= 1")

    def aggregate(self, scores: list[float], done: list[float] | None = None) -> list[float]:
        """Aggregated score after each token of ``scores``.

        ``done`` may hold the aggregates already computed for a prefix of ``scores``; only the
        rest is computed, so appending one token costs O(1) (O(window) for windows).
        """
        out: list[float] = list(done or [])
        for i in range(len(out), len(scores)):
            s = scores[i]
            if self.kind == "none":
                out.append(s)
            elif self.kind == "ema":
                out.append(s if i == 0 else self.alpha * s + (1.0 - self.alpha) * out[-1])
            else:
                lo = max(0, i + 1 - self.window)
                out.append(sum(scores[lo : i + 1]) / (i + 1 - lo))
        return out


def require_finite(what: str, value: torch.Tensor | float | None) -> None:
    """ValueError unless every entry of ``value`` is finite (a NaN or inf weight silently turns a
    monitor off or makes it fire on everything, so it must never load)."""
    if value is None:
        return
    t = torch.as_tensor(value)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{what} holds {bad} non-finite value(s) (NaN or inf)")


class Monitor(ABC):
    """Stateless scorer. ``threshold`` applies to the aggregated score."""

    name: str
    layer: int | None
    threshold: float
    aggregation: AggregationSpec

    @abstractmethod
    def score(self, hidden: torch.Tensor | None, token_ids: list[int]) -> list[float]:
        """Raw per-token scores for ``len(token_ids)`` tokens; ``hidden`` is ``[n, d]`` or ``None``."""

    def score_tensor(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` activations -> ``[n]`` raw scores, on ``hidden``'s device.

        The batched entry point of activation monitors, and the only one vLLM's worker calls: it
        runs inside the model's compiled graph (and CUDA graphs), so it must be tensor math with
        no host sync, no Python branch on values and no dependence on token ids. ``score`` of an
        activation monitor must equal ``score_tensor(hidden).tolist()``."""
        raise NotImplementedError(f"{type(self).__name__} does not score tensors")

    def steering_vector(self) -> torch.Tensor | None:
        """Unit direction whose subtraction steers away from what the monitor detects, if any."""
        return None

    def new_state(self) -> MonitorState:
        return MonitorState(self)


@dataclass
class MonitorState:
    """Per-generation scores of one monitor over the output tokens."""

    monitor: Monitor
    raw: list[float] = field(default_factory=list)
    agg: list[float] = field(default_factory=list)
    scale: float = 1.0
    """Multiplies the monitor's threshold for this generation (below 1: stricter, e.g. on retries
    after the monitor fired)."""

    @property
    def threshold(self) -> float:
        """The threshold this state fires above: ``monitor.threshold * scale``."""
        return self.monitor.threshold * self.scale

    def extend(self, start: int, scores: list[float]) -> int | None:
        """Record scores for output positions ``start..``; return the first position that fires.

        ``start`` may be below ``len(self.raw)`` (a re-fed token after a rollback): later scores
        are replaced. Returns ``None`` when no new position crosses the threshold.
        """
        self.truncate(start)
        self.raw.extend(scores)
        self.agg = self.monitor.aggregation.aggregate(self.raw, self.agg)
        for pos in range(start, len(self.agg)):
            if self.agg[pos] > self.threshold:
                return pos
        return None

    def truncate(self, length: int) -> None:
        del self.raw[length:]
        del self.agg[length:]
