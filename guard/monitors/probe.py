"""Linear probe monitor: a logistic score on one layer's residual stream.

Per token, ``score(h) = sigmoid(w . ((h - mean) / std) + b)``; without standardisation ``mean = 0``
and ``std = 1``. The standardisation is folded into an effective weight once at construction, so
scoring ``n`` tokens is one ``[n, d] @ [d]`` product. The logit is computed in float32, the
sigmoid in float64 so that confident scores do not all round to exactly 1.0 (a threshold
of 1.0 could then never be exceeded).

On disk a probe is a directory (see :data:`FORMAT_VERSION`):

- ``probe.safetensors``: ``direction`` [d] and ``bias`` [] or [1] (float32), optionally ``mean`` and
  ``std`` [d] (both or neither).
- ``probe.json``: ``{"format": "guard.probe", "version": 1, "layer", "d_model", "threshold",
  "target_fpr", "aggregation": {"kind", "alpha", "window"}, "method", "model": {"name", "path",
  "config_sha256", "num_layers"}, "metrics": {...}, "training": {...}}``. ``layer``, ``d_model``,
  ``threshold`` and ``aggregation`` are required; the rest is provenance and is kept verbatim.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from guard.errors import ModelLoadError
from guard.modelinfo import ModelInfo
from guard.monitors.base import AggregationSpec, Monitor, require_finite

FORMAT_NAME = "guard.probe"
FORMAT_VERSION = 1
TENSORS_FILE = "probe.safetensors"
META_FILE = "probe.json"

log = logging.getLogger(__name__)


def config_fingerprint(model_dir: str | Path) -> str | None:
    """sha256 of a HF model directory's ``config.json`` (``None`` if it has none)."""
    cfg = Path(model_dir) / "config.json"
    return hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None


def aggregation_to_dict(spec: AggregationSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "alpha": spec.alpha, "window": spec.window}


class ProbeMonitor(Monitor):
    """A linear probe read at ``layer``. ``meta`` is the probe.json provenance (kept on save)."""

    def __init__(
        self,
        name: str,
        layer: int,
        direction: torch.Tensor,
        bias: float | torch.Tensor,
        *,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        threshold: float = 0.5,
        aggregation: AggregationSpec | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        direction = torch.as_tensor(direction, dtype=torch.float32).detach()
        if direction.ndim != 1 or direction.numel() == 0:
            raise ValueError(
                f"direction must be a non-empty vector, got shape {tuple(direction.shape)}"
            )
        d = direction.numel()
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together")
        for label, t in (("mean", mean), ("std", std)):
            if t is not None and tuple(t.shape) != (d,):
                raise ValueError(
                    f"{label} has shape {tuple(t.shape)}, expected ({d},) like direction"
                )
        finite: tuple[tuple[str, torch.Tensor | float | None], ...] = (
            ("direction", direction),
            ("bias", bias),
            ("mean", mean),
            ("std", std),
            ("threshold", threshold),
        )
        for label, value in finite:
            require_finite(label, value)
        if std is not None and not bool((std > 0).all()):
            raise ValueError("std must be positive everywhere")
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        self.name = name
        self.layer: int = int(layer)
        self.threshold = float(threshold)
        self.aggregation = aggregation or AggregationSpec()
        self.direction = direction
        self.bias = float(torch.as_tensor(bias, dtype=torch.float32).reshape(-1)[0])
        self.mean = None if mean is None else mean.detach().float()
        self.std = None if std is None else std.detach().float()
        self.meta: dict[str, Any] = dict(meta or {})
        # w . (h - m) / s + b  ==  (w / s) . h + (b - (w / s) . m)
        self._w = direction if self.std is None else direction / self.std
        self._b = self.bias if self.mean is None else self.bias - float(self._w @ self.mean)
        require_finite("direction / std (a std too small for float32)", self._w)
        require_finite("the folded bias", self._b)
        self._w_by_device: dict[torch.device, torch.Tensor] = {}

    @property
    def d_model(self) -> int:
        return self.direction.numel()

    # -- scoring ----------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` activations -> ``[n]`` float32 logits (half-precision inputs are upcast first)."""
        if hidden.ndim != 2 or hidden.shape[1] != self.d_model:
            raise ValueError(
                f"probe '{self.name}' expects [n, {self.d_model}] activations, "
                f"got {tuple(hidden.shape)}"
            )
        w = self._w_by_device.get(hidden.device)
        if w is None:
            w = self._w_by_device[hidden.device] = self._w.to(hidden.device)
        return hidden.float() @ w + self._b

    def score_tensor(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` activations -> ``[n]`` float64 scores in [0, 1]."""
        return torch.sigmoid(self.logits(hidden).double())

    def score(self, hidden: torch.Tensor | None, token_ids: list[int]) -> list[float]:
        if hidden is None:
            raise ValueError(f"probe '{self.name}' needs layer {self.layer} activations")
        if hidden.shape[0] != len(token_ids):
            raise ValueError(f"{hidden.shape[0]} activations for {len(token_ids)} tokens")
        return self.score_tensor(hidden).tolist()

    def steering_vector(self) -> torch.Tensor:
        """Unit vector along ``w / std`` in raw activation space (the gradient of the logit)."""
        return self._w / self._w.norm().clamp_min(1e-12)

    # -- compatibility ----------------------------------------------------------------------

    def check_compatible(self, info: ModelInfo, model_dir: str | Path | None = None) -> None:
        """Raise :class:`ModelLoadError` unless the probe can read ``info``'s model.

        With ``model_dir``, a config.json that differs from the one the probe was trained on is
        logged as a warning (same shapes, possibly different weights or a harmless config edit).
        """
        if info.d_model != self.d_model:
            raise ModelLoadError(
                f"probe '{self.name}' has d_model {self.d_model} but model '{info.name}' has "
                f"d_model {info.d_model}; retrain it with `guard probe train --model ...`"
            )
        if self.layer >= info.num_layers:
            raise ModelLoadError(
                f"probe '{self.name}' reads layer {self.layer} but model '{info.name}' has "
                f"{info.num_layers} layers (0..{info.num_layers - 1})"
            )
        trained = (self.meta.get("model") or {}).get("config_sha256")
        if model_dir is not None and trained:
            current = config_fingerprint(model_dir)
            if current != trained:
                log.warning(
                    "probe '%s' was trained on a model with a different config.json (%s, now %s at %s)",
                    self.name,
                    trained[:12],
                    (current or "none")[:12],
                    model_dir,
                )

    # -- storage ----------------------------------------------------------------------------

    def to_meta(self) -> dict[str, Any]:
        """The probe.json content: provenance from ``meta`` plus the current decision settings."""
        meta = dict(self.meta)
        meta.update(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            layer=self.layer,
            d_model=self.d_model,
            threshold=self.threshold,
            aggregation=aggregation_to_dict(self.aggregation),
            standardized=self.mean is not None,
        )
        return meta

    def save(self, directory: str | Path) -> Path:
        """Write ``probe.safetensors`` and ``probe.json`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "direction": self.direction.contiguous(),
            "bias": torch.tensor([self.bias], dtype=torch.float32),
        }
        if self.mean is not None and self.std is not None:  # given together (checked in __init__)
            tensors.update(mean=self.mean.contiguous(), std=self.std.contiguous())
        save_file(
            tensors,
            str(out / TENSORS_FILE),
            metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)},
        )
        (out / META_FILE).write_text(json.dumps(self.to_meta(), indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        name: str,
        layer: int | None = None,
        threshold: float | None = None,
        aggregation: AggregationSpec | None = None,
    ) -> ProbeMonitor:
        """Load a probe directory; ``threshold`` and ``aggregation`` override the file's values.

        ``layer`` may only restate the trained layer: a direction is specific to its layer.
        Any problem with the files is a :class:`ModelLoadError` naming the file.
        """
        directory = Path(directory)
        meta = _read_meta(directory)
        tensors = _read_tensors(directory)
        where = directory / TENSORS_FILE
        d = tensors["direction"].numel()
        if meta["d_model"] != d:
            raise ModelLoadError(
                f"{where}: direction has {d} entries but {META_FILE} says d_model {meta['d_model']}"
            )
        if layer is not None and layer != meta["layer"]:
            raise ModelLoadError(
                f"probe '{name}' ({directory}) was trained on layer {meta['layer']}; the policy asks "
                f"for layer {layer}. A probe direction only applies to its own layer: drop "
                f"`layer` from the policy or train a new probe with --layer {layer}"
            )
        try:
            agg = aggregation or AggregationSpec(**meta["aggregation"])
            return cls(
                name,
                meta["layer"],
                tensors["direction"],
                tensors["bias"],
                mean=tensors.get("mean"),
                std=tensors.get("std"),
                threshold=meta["threshold"] if threshold is None else threshold,
                aggregation=agg,
                meta=meta,
            )
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"invalid probe {directory}: {exc}") from exc


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a probe directory: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read probe metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: unsupported probe format {meta.get('format')!r} version "
            f"{meta.get('version')!r} (this guard reads {FORMAT_NAME!r} version {FORMAT_VERSION})"
        )
    for key, kind in (
        ("layer", int),
        ("d_model", int),
        ("threshold", (int, float)),
        ("aggregation", dict),
    ):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ModelLoadError(
                f"{path}: field '{key}' is missing or not a {getattr(kind, '__name__', 'number')}"
            )
    return meta


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / TENSORS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a probe directory: {TENSORS_FILE} is missing")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ModelLoadError(f"{path}: cannot read tensors: {exc}") from exc
    for key in ("direction", "bias"):
        if key not in tensors:
            raise ModelLoadError(f"{path}: tensor '{key}' is missing (has {sorted(tensors)})")
    unknown = set(tensors) - {"direction", "bias", "mean", "std"}
    if unknown:
        raise ModelLoadError(f"{path}: unexpected tensors {sorted(unknown)}")
    direction = tensors["direction"]
    if direction.ndim != 1 or direction.numel() == 0:
        raise ModelLoadError(
            f"{path}: 'direction' must have shape [d_model], got {list(direction.shape)}"
        )
    if tensors["bias"].numel() != 1:
        raise ModelLoadError(
            f"{path}: 'bias' must hold one value, got shape {list(tensors['bias'].shape)}"
        )
    if ("mean" in tensors) != ("std" in tensors):
        raise ModelLoadError(f"{path}: 'mean' and 'std' must be stored together")
    for key in ("mean", "std"):
        if key in tensors and list(tensors[key].shape) != list(direction.shape):
            raise ModelLoadError(
                f"{path}: '{key}' has shape {list(tensors[key].shape)}, expected "
                f"{list(direction.shape)} like 'direction'"
            )
    for key, t in tensors.items():
        try:
            require_finite(f"'{key}'", t.float())
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
    if "std" in tensors and not bool((tensors["std"] > 0).all()):
        raise ModelLoadError(f"{path}: 'std' must be positive everywhere")
    return {k: v.float() for k, v in tensors.items()}
