"""Throughput with an SAE feature monitor vs none, side by side in one run.

Same method as ``bench/throughput.py`` (whose ``run_mixed`` and ``TimedJob`` it uses): a
random-weight Llama with d_model >= 1024; each round submits the same concurrent generations
twice at once to one engine worker, which interleaves them step by step, and each job's time in
the worker is accounted to its kind, so both kinds run under the same machine conditions.

- unguarded: no monitor, no hold-back;
- guarded: a random SAE (d_sae 16384, JumpReLU, b_dec subtracted, constant-norm rescaling) on
  one layer watching k=8 features with thresholds so high they never fire (throughput is what is
  measured), aggregation none, an 8-token hold-back.

    python bench/sae_throughput.py [--d-model 1024] [--layers 4] [--d-sae 16384] [--k 8] [--streams 8]
                                   [--tokens 96] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import measure, print_rates, random_engine  # bench/ is not a package

from guard.controller.backtrack import BoundMonitor
from guard.engine.worker import EngineWorker
from guard.policy.build import default_controller_config
from guard.sae.model import Sae
from guard.sae.monitor import SaeFeatureMonitor, WatchedFeature


def random_sae(d_in: int, d_sae: int, layer: int) -> Sae:
    g = torch.Generator().manual_seed(0)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    return Sae(
        W_enc,
        torch.zeros(d_sae),
        W_enc.T,
        torch.randn(d_in, generator=g) * 0.1,
        "jumprelu",
        threshold=torch.full((d_sae,), 0.5),
        apply_b_dec_to_input=True,
        normalize="constant_norm_rescale",
        layer=layer,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine = random_engine(args.d_model, args.layers)
    worker = EngineWorker()
    layer = args.layers // 2
    sae = random_sae(args.d_model, args.d_sae, layer)
    idx = torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(1))[: args.k].tolist()
    monitor = SaeFeatureMonitor("sae", sae, [WatchedFeature(i, 1e9) for i in idx])
    del sae  # the monitor keeps only the d x k slice

    guarded = f"guarded (SAE, {args.k} features)"
    kinds = {
        "unguarded": ([], default_controller_config(holdback_tokens=0)),
        guarded: (
            [BoundMonitor(monitor)],
            default_controller_config(holdback_tokens=8, rollback="sentence", max_retries=3),
        ),
    }
    counts, seconds, fired = measure(engine, worker, kinds, args.streams, args.tokens, args.rounds)
    worker.stop()
    print(
        f"model: random Llama d_model={args.d_model} layers={args.layers}; SAE d_sae={args.d_sae} at layer {layer}, "
        f"{args.k} watched features; {args.rounds} rounds of {args.streams} unguarded + {args.streams} guarded "
        f"streams x {args.tokens} tokens, interleaved in one worker; {torch.get_num_threads()} thread(s)\n"
    )
    ratio = print_rates(counts, seconds, guarded)
    print(
        f"\nthroughput ratio guarded/unguarded: {ratio:.3f} (target >= 0.97); "
        f"generations that were not clean: {fired}"
    )


if __name__ == "__main__":
    main()
