"""Cost per token of watching k SAE features: the sliced monitor vs a full encode.

A random SAE at Llama-8B scale (d_in 4096, d_sae 65536, float32 on CPU; W_enc alone is 1 GiB, and
W_dec is a transposed view of it so no second GiB is allocated). For batches of 1 token (one
decoding step) and of 64 tokens (a prefill chunk) it times:

- full: ``sae.encode(x)[:, idx]`` followed by the rule, i.e. d_in * d_sae multiply-adds per token;
- sliced: :meth:`SaeFeatureMonitor.score_tensor`, which computes only the k watched features
  (d_in * k per token, b_dec folded into the bias).

It first checks that both give the same feature activations, then prints a table of microseconds
per token and the ratio (the target is >= 100x).

    python bench/sae_cost.py [--d-in 4096] [--d-sae 65536] [--k 8] [--activation jumprelu] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from guard.sae.model import Activation, Sae
from guard.sae.monitor import SaeFeatureMonitor, WatchedFeature


def random_sae(d_in: int, d_sae: int, activation: Activation) -> Sae:
    g = torch.Generator().manual_seed(0)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    threshold = torch.full((d_sae,), 0.5) if activation == "jumprelu" else None
    return Sae(
        W_enc,
        torch.zeros(d_sae),
        W_enc.T,
        torch.randn(d_in, generator=g) * 0.1,
        activation,
        apply_b_dec_to_input=True,
        normalize="constant_norm_rescale",
        layer=0,
        threshold=threshold,
    )


def per_token_us(fn, x: torch.Tensor, min_seconds: float, min_reps: int = 3) -> float:
    """Median-free simple timing: repeat ``fn(x)`` for at least ``min_seconds``; microseconds per token."""
    fn(x)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_seconds:
        fn(x)
        reps += 1
    return (time.perf_counter() - t0) / reps / x.shape[0] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--activation", choices=["relu", "jumprelu"], default="jumprelu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timing time per cell")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sae = random_sae(args.d_in, args.d_sae, args.activation)
    idx = torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(1))[: args.k]
    mon = SaeFeatureMonitor("bench", sae, [WatchedFeature(int(i), 1.0) for i in idx])

    def full(x: torch.Tensor) -> torch.Tensor:
        f = sae.encode(x)[:, idx]
        r = (f / mon.feature_thresholds).amax(dim=-1).double()
        return r / (1 + r)

    x = torch.randn(64, args.d_in, generator=torch.Generator().manual_seed(2)) * 3
    torch.testing.assert_close(mon.feature_acts(x), sae.encode(x)[:, idx], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mon.score_tensor(x), full(x), rtol=1e-4, atol=1e-4)

    print(
        f"SAE d_in={args.d_in} d_sae={args.d_sae} {args.activation}, apply_b_dec_to_input, "
        f"constant_norm_rescale; {args.k} watched features; float32 CPU, {args.threads} thread(s)\n"
    )
    print(
        f"| {'tokens/call':>11} | {'full encode us/token':>20} | {'sliced us/token':>15} | {'ratio':>8} |"
    )
    print(f"|{'-' * 13}|{'-' * 22}|{'-' * 17}|{'-' * 10}|")
    worst = float("inf")
    for n in (1, 64):
        xn = x[:n].contiguous()
        t_full = per_token_us(full, xn, args.seconds)
        t_slice = per_token_us(mon.score_tensor, xn, args.seconds)
        worst = min(worst, t_full / t_slice)
        print(f"| {n:>11} | {t_full:>20.1f} | {t_slice:>15.2f} | {t_full / t_slice:>7.0f}x |")
    print(
        f"\nsmallest ratio: {worst:.0f}x (target >= 100x): {'ok' if worst >= 100 else 'BELOW TARGET'}"
    )


if __name__ == "__main__":
    main()
