"""A sparse autoencoder as plain tensors, independent of the file format it came from.

Every loader in :mod:`guard.sae.formats` produces a :class:`Sae`; the feature monitor and the
training code only ever see this one layout:

- ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``.
- Encoding ``x [n, d_in]``:
  ``x' = norm(x) - b_dec * apply_b_dec_to_input``, ``pre = x' @ W_enc + b_enc``, then per
  ``activation``: relu ``relu(pre)``; jumprelu ``relu(pre) * (pre > threshold)``; topk the ``k``
  largest of ``relu(pre)`` per token, zeros elsewhere; gated (SAELens layout, no ``b_enc`` of its
  own) ``(x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc * exp(r_mag)) + b_mag)``.
- Decoding ``f [n, d_sae]``: ``f @ W_dec + b_dec`` (in normalized space; the inverse of the
  normalization is not applied, nothing in guard needs the reconstruction in raw units).

``layer`` is an *engine* layer: the output of decoder block ``layer``, i.e. HF
``hidden_states[layer + 1]`` and TransformerLens ``blocks.{layer}.hook_resid_post``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor

from guard.errors import ModelLoadError

Activation = Literal["relu", "jumprelu", "topk", "gated"]
Normalize = Literal["none", "constant_norm_rescale", "layer_norm", "expected_average_only_in"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk", "gated")
NORMALIZATIONS: tuple[str, ...] = (
    "none",
    "constant_norm_rescale",
    "layer_norm",
    "expected_average_only_in",
)
LAYER_NORM_EPS = 1e-5
"""SAELens' epsilon for ``normalize_activations: layer_norm``."""

_HOOK_PATTERNS = (
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),
    (re.compile(r"^(?:model\.)?layers\.(\d+)$"), 0),
)
SUPPORTED_HOOKS = (
    "blocks.L.hook_resid_post (engine layer L)",
    "blocks.L.hook_resid_pre for L >= 1 (engine layer L-1)",
    "layers.L / model.layers.L, the HF module whose output is read (engine layer L)",
)


def layer_for_hook(hook_name: str) -> int:
    """The engine layer whose output ``hook_name`` reads.

    ``blocks.L.hook_resid_post`` is the output of block L; ``blocks.L.hook_resid_pre`` is the input
    of block L, i.e. the output of block L-1. ``blocks.0.hook_resid_pre`` is the embedding output,
    which no engine layer exposes. Anything else (attention/MLP outputs, hook_resid_mid, hook_z)
    is not a residual-stream layer the engine can hand over: :class:`ModelLoadError`.
    """
    for pattern, offset in _HOOK_PATTERNS:
        m = pattern.match(hook_name.strip())
        if m:
            layer = int(m.group(1)) + offset
            if layer < 0:
                raise ModelLoadError(
                    f"hook '{hook_name}' reads the embedding output, which is not an engine layer; "
                    "use an SAE trained on a block output (blocks.L.hook_resid_post, L >= 0)"
                )
            return layer
    raise ModelLoadError(
        f"unsupported SAE hook '{hook_name}': guard reads the residual stream only; supported: "
        + "; ".join(SUPPORTED_HOOKS)
    )


_T = TypeVar("_T")


def present(value: _T | None, what: str) -> _T:
    """``value``, a field that the SAE's activation or normalization requires (``__post_init__``
    checks they are set); :class:`ValueError` naming ``what`` if it is missing after all."""
    if value is None:
        raise ValueError(f"this SAE has no {what}")
    return value


@dataclass
class Sae:
    """SAE weights and the encode rule. Shapes are checked in ``__post_init__`` (``ValueError``)."""

    W_enc: Tensor
    """Encoder ``[d_in, d_sae]``."""
    b_enc: Tensor
    """Encoder bias ``[d_sae]``. Unused by gated SAEs (loaders set it to ``b_gate``)."""
    W_dec: Tensor
    """Decoder ``[d_sae, d_in]``; row i is feature i's direction."""
    b_dec: Tensor
    """Decoder bias ``[d_in]``."""
    activation: Activation
    """relu, jumprelu (needs ``threshold``), topk (needs ``k``) or gated (needs ``b_gate``, ``r_mag``, ``b_mag``)."""
    threshold: Tensor | None = None
    """JumpReLU threshold ``[d_sae]``: a feature is active when its pre-activation exceeds it."""
    k: int | None = None
    """TopK: active features per token."""
    b_gate: Tensor | None = None
    """Gated: gate bias ``[d_sae]``."""
    r_mag: Tensor | None = None
    """Gated: log scale of the magnitude path, ``W_mag = W_enc * exp(r_mag)``, ``[d_sae]``."""
    b_mag: Tensor | None = None
    """Gated: magnitude bias ``[d_sae]``."""
    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from the (normalized) input before encoding."""
    normalize: Normalize = "none"
    """Input normalization applied before everything else (SAELens ``normalize_activations``)."""
    norm_scale: float | None = None
    """The constant factor of ``expected_average_only_in`` (``x' = x * norm_scale``)."""
    hook_name: str | None = None
    """Where the SAE was trained (TransformerLens name), if the file says."""
    layer: int | None = None
    """Engine layer the SAE reads (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.W_enc.ndim != 2:
            raise ValueError(f"W_enc must be [d_in, d_sae], got {list(self.W_enc.shape)}")
        d_in, d_sae = self.W_enc.shape
        expect = {
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
            "threshold": (d_sae,),
            "b_gate": (d_sae,),
            "r_mag": (d_sae,),
            "b_mag": (d_sae,),
        }
        for name, shape in expect.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(
                    f"{name} has shape {list(t.shape)}, expected {list(shape)} (W_enc is {[d_in, d_sae]})"
                )
        required = {
            "jumprelu": ("threshold",),
            "gated": ("b_gate", "r_mag", "b_mag"),
            "topk": ("k",),
        }
        for name in required.get(self.activation, ()):
            if getattr(self, name) is None:
                raise ValueError(f"activation {self.activation} needs {name}")
        if self.k is not None and not 1 <= self.k <= d_sae:
            raise ValueError(f"k must be in 1..{d_sae}, got {self.k}")
        if self.normalize == "expected_average_only_in" and not (
            self.norm_scale and self.norm_scale > 0
        ):
            raise ValueError("normalize expected_average_only_in needs a positive norm_scale")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Sae:
        """A copy with every tensor moved/cast (tensors already matching are shared, not copied)."""
        moved = {
            f.name: getattr(self, f.name).to(device=device, dtype=dtype)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)

    # -- encode / decode --------------------------------------------------------------------

    def normalize_input(self, x: Tensor) -> Tensor:
        """``norm(x)``: the configured normalization only (no ``b_dec`` subtraction)."""
        return normalize_input(x, self.normalize, self.norm_scale)

    def process_input(self, x: Tensor) -> Tensor:
        """``x' = norm(x) - b_dec * apply_b_dec_to_input`` in the weights' dtype."""
        x = self.normalize_input(x.to(self.dtype))
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_activation(self, x: Tensor) -> Tensor:
        """``x' @ W_enc + b_enc`` (gated: the gate pre-activation ``x' @ W_enc + b_gate``)."""
        bias = present(self.b_gate, "b_gate") if self.activation == "gated" else self.b_enc
        return self.process_input(x) @ self.W_enc + bias

    def encode(self, x: Tensor) -> Tensor:
        """``[n, d_in]`` -> ``[n, d_sae]`` feature activations."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"SAE expects [n, {self.d_in}] inputs, got {list(x.shape)}")
        if self.activation == "gated":
            xp = self.process_input(x)
            gate = (xp @ self.W_enc + present(self.b_gate, "b_gate")) > 0
            mag = torch.relu(
                xp @ (self.W_enc * present(self.r_mag, "r_mag").exp())
                + present(self.b_mag, "b_mag")
            )
            return mag * gate
        pre = self.pre_activation(x)
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > present(self.threshold, "threshold"))
        top = torch.relu(pre).topk(present(self.k, "k"), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

    def decode(self, f: Tensor) -> Tensor:
        """``[n, d_sae]`` -> ``[n, d_in]`` reconstruction (in normalized space)."""
        return f.to(self.dtype) @ self.W_dec + self.b_dec


def normalize_input(x: Tensor, normalize: str, norm_scale: float | None = None) -> Tensor:
    """SAELens' input normalizations, per token (rows of ``x``)."""
    if normalize == "none":
        return x
    if normalize == "constant_norm_rescale":
        return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    if normalize == "layer_norm":
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred / (centred.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
    if normalize == "expected_average_only_in":
        if norm_scale is None:
            raise ValueError("expected_average_only_in needs norm_scale")
        return x * norm_scale
    raise ValueError(f"unknown normalization {normalize!r}; expected one of {NORMALIZATIONS}")
