"""Training a small sparse autoencoder on residual-stream activations (CPU, full determinism).

Contract of :func:`train_sae`:

- Deterministic for a seed: initialisation and batch order come from one ``torch.Generator``
  seeded with ``config.seed``; nothing reads the global RNG.
- Inputs are rescaled by one constant ``s`` (so the mean squared norm of the centred data is
  ``d_in``) to make learning rates and ``l1`` independent of the model's activation scale; ``s``
  is folded back into the weights, so the returned :class:`~guard.sae.model.Sae` takes raw
  activations with ``normalize="none"`` and ``apply_b_dec_to_input=True``.
- TopK (``k``): decoder rows are kept at unit norm; an auxiliary TopK loss on the residual,
  restricted to latents dead for ``dead_after`` steps, revives dead latents (Gao et al. 2024).
  ReLU (``l1``): loss ``FVU + l1 * mean_t sum_i f_i |W_dec_i|`` (Anthropic, "Towards
  monosemanticity" style norm-weighted L1).
- :class:`SaeStats` are measured on the tokens given as ``eval_x`` (held-out rows), with the
  returned SAE itself, so they describe exactly what is saved.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from guard.sae.model import Sae


@dataclass
class SaeTrainConfig:
    """Everything that decides an SAE besides its data."""

    d_sae: int
    """Number of latents."""
    k: int | None = None
    """TopK: active latents per token. Exactly one of ``k`` and ``l1`` is set."""
    l1: float | None = None
    """ReLU: weight of the norm-weighted L1 penalty (in units of the fraction of variance)."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 1024
    """Tokens per step, drawn with replacement."""
    lr: float | None = None
    """Adam learning rate; default ``2e-4 / sqrt(d_sae / 16384)`` (the sparsify rule)."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    dead_after: int = 200
    """TopK: a latent that fired in none of the last ``dead_after`` steps is dead (AuxK revives it)."""
    aux_coef: float = 1 / 32
    """TopK: weight of the AuxK loss."""

    def __post_init__(self) -> None:
        if (self.k is None) == (self.l1 is None):
            raise ValueError("set exactly one of k (TopK SAE) and l1 (ReLU SAE with an L1 penalty)")
        if self.d_sae < 1:
            raise ValueError(f"d_sae must be >= 1, got {self.d_sae}")
        if self.k is not None and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")
        if self.l1 is not None and self.l1 < 0:
            raise ValueError(f"l1 must be >= 0, got {self.l1}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 16384)


class SaeStats(NamedTuple):
    """Reconstruction quality of an SAE on a set of tokens."""

    mse: float
    """Mean squared error per activation entry, in raw activation units."""
    fve: float
    """Fraction of variance explained: ``1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2``."""
    l0: float
    """Mean number of active latents per token."""
    dead_frac: float
    """Fraction of latents that are zero on every token."""
    tokens: int


class SaeTrainResult(NamedTuple):
    sae: Sae
    initial: SaeStats
    """The initialisation's stats on the evaluation tokens (what training improved on)."""
    final: SaeStats
    """The trained SAE's stats on the evaluation tokens."""
    dead_frac_train: float
    """Fraction of latents zero on every *training* token."""


@torch.no_grad()
def sae_stats(sae: Sae, x: Tensor, chunk: int = 8192) -> SaeStats:
    """:class:`SaeStats` of ``sae`` on ``x [n, d_in]`` (chunked, so memory stays ``chunk * d_sae``)."""
    x = x.float()
    mean = x.mean(0)
    err = var = l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        f = sae.encode(xb)
        err += float(((sae.decode(f).float() - xb) ** 2).sum())
        var += float(((xb - mean) ** 2).sum())
        active = f > 0
        l0 += float(active.sum())
        fired |= active.any(0)
    n = max(1, len(x))
    return SaeStats(
        err / (n * sae.d_in),
        1.0 - err / max(var, 1e-12),
        l0 / n,
        float((~fired).float().mean()),
        len(x),
    )


def train_sae(
    x: Tensor,
    config: SaeTrainConfig,
    *,
    eval_x: Tensor | None = None,
    layer: int | None = None,
    hook_name: str | None = None,
    progress: bool = False,
) -> SaeTrainResult:
    """Train on the tokens ``x [n, d_in]``; report on ``eval_x`` (default: ``x``).

    Numbered phases: (1) scale and initialise, (2) optimise, (3) fold the scale into the weights.
    """
    x = x.float()
    eval_x = x if eval_x is None else eval_x.float()
    gen = torch.Generator().manual_seed(config.seed)
    # 1. scale so the centred data has mean squared norm d_in; initialise in that space
    mu = x.mean(0)
    scale = float(((x - mu) ** 2).sum(1).mean().sqrt()) / math.sqrt(x.shape[1])
    scale = scale if scale > 0 else 1.0
    xs = x / scale
    params = _init(xs, config.d_sae, gen)
    initial = sae_stats(_to_sae(params, scale, config, layer, hook_name), eval_x)
    # 2. optimise
    _optimise(xs, params, config, gen, progress)
    # 3. fold the scale back and measure
    sae = _to_sae(params, scale, config, layer, hook_name)
    return SaeTrainResult(sae, initial, sae_stats(sae, eval_x), sae_stats(sae, x).dead_frac)


def _init(xs: Tensor, d_sae: int, gen: torch.Generator) -> dict[str, Tensor]:
    d = xs.shape[1]
    w_dec = torch.randn(d_sae, d, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    return {
        "W_enc": w_dec.T.clone().requires_grad_(),
        "b_enc": torch.zeros(d_sae, requires_grad=True),
        "W_dec": w_dec.requires_grad_(),
        "b_dec": xs.mean(0).clone().requires_grad_(),
    }


def _encode(p: dict[str, Tensor], xb: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
    """(pre-activations, activations) in the scaled space."""
    pre = (xb - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if k is None:
        return pre, torch.relu(pre)
    top = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return pre, torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def _optimise(
    xs: Tensor, p: dict[str, Tensor], cfg: SaeTrainConfig, gen: torch.Generator, progress: bool
) -> None:
    opt = torch.optim.Adam(list(p.values()), lr=cfg.learning_rate, betas=(0.9, 0.999))
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    for step in range(cfg.steps):
        xb = xs[torch.randint(len(xs), (cfg.batch_size,), generator=gen)]
        pre, f = _encode(p, xb, cfg.k)
        recon = f @ p["W_dec"] + p["b_dec"]
        denom = ((xb - xb.mean(0)) ** 2).sum().clamp_min(1e-12)
        loss = ((recon - xb) ** 2).sum() / denom
        if cfg.k is None:
            loss = loss + cfg.l1 * (f * p["W_dec"].norm(dim=1)).sum(1).mean()
        else:
            fired = (f > 0).any(0)
            since_fired = torch.where(fired, 0, since_fired + 1)
            loss = loss + cfg.aux_coef * _aux_loss(
                p, pre, xb - recon.detach(), since_fired > cfg.dead_after, xs.shape[1]
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.k is not None:
            with torch.no_grad():
                p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
        if progress and (step + 1) % max(1, cfg.steps // 20) == 0:
            print(
                f"\rsae: step {step + 1}/{cfg.steps} loss {float(loss):.4f}",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if progress and cfg.steps:
        print(file=sys.stderr)


def _aux_loss(
    p: dict[str, Tensor], pre: Tensor, residual: Tensor, dead: Tensor, d_in: int
) -> Tensor:
    """AuxK: reconstruct the main loss's residual from the top dead latents only."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = min(d_in // 2, n_dead)
    masked = torch.where(dead, torch.relu(pre), torch.zeros_like(pre))
    top = masked.topk(k_aux, dim=-1, sorted=False)
    f_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    denom = ((residual - residual.mean(0)) ** 2).sum().clamp_min(1e-12)
    return ((f_aux @ p["W_dec"] - residual) ** 2).sum() / denom


def _to_sae(
    p: dict[str, Tensor],
    scale: float,
    cfg: SaeTrainConfig,
    layer: int | None,
    hook_name: str | None,
) -> Sae:
    """The raw-space SAE: ``pre = (x - s b) @ (W / s) + b_enc``, ``x_hat = s (f @ D + b)``."""
    with torch.no_grad():
        return Sae(
            W_enc=(p["W_enc"] / scale).detach().clone(),
            b_enc=p["b_enc"].detach().clone(),
            W_dec=(p["W_dec"] * scale).detach().clone(),
            b_dec=(p["b_dec"] * scale).detach().clone(),
            activation="relu" if cfg.k is None else "topk",
            k=cfg.k,
            apply_b_dec_to_input=True,
            hook_name=hook_name,
            layer=layer,
        )
