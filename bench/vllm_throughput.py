"""vLLM throughput with monitors in its worker vs without, side by side in one run; recomputation
per rollback from vLLM's own prefix-cache counters.

Builds a random-weight Llama with d_model >= 1024 (no download) and serves it with the vLLM
engine (vLLM's default compilation, prefix caching, block size 32). Rounds alternate between

- unguarded: the controller with no monitor and no hold-back;
- guarded: a linear probe read inside vLLM's worker (random direction, calibrated so it never
  fires, since throughput is what is measured here), EMA aggregation, an 8-token hold-back;

each round submits ``--streams`` concurrent generations of ``--tokens`` tokens to one engine
worker, so vLLM batches them together (continuous batching), and is timed from submission to the
last finish. tokens/s = generated tokens / wall time, summed over the rounds of each kind.

A last run fires the same probe on about 5% of tokens (threshold at the 95th percentile of its
scores on sampled text, computed with the transformers engine on the same weights), rolling back 4
tokens each time. Each rollback is a new vLLM request with the prompt + accepted token ids; the
table prints how many of those tokens vLLM's prefix cache served (``num_cached_tokens``) and how
many it recomputed.

    python bench/vllm_throughput.py [--d-model 1024] [--layers 4] [--streams 16] [--tokens 96] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _quantile_threshold, run_mixed  # bench/ is not a package

from guard.controller.backtrack import BoundMonitor
from guard.engine.transformers_engine import TransformersEngine
from guard.engine.vllm_engine import VLLMEngine
from guard.engine.worker import EngineWorker
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.policy.build import default_controller_config, default_vllm_options
from guard.testing import make_random_llama

BLOCK = 32


def run_round(
    engine, worker, monitors, config, streams: int, tokens: int, seed0: int
) -> tuple[int, float, list]:
    """Submit ``streams`` generations at once (vLLM batches them); return (generated tokens, wall
    seconds from submission to the last finish, finished events)."""
    t0 = time.perf_counter()
    fins = run_mixed(
        engine, worker, {"run": (monitors, config)}, streams, tokens, seed0, {"run": 0.0}
    )["run"]
    return sum(f.usage.generated_tokens for f in fins), time.perf_counter() - t0, fins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    path = make_random_llama(
        tmp.name + "/m", hidden=args.d_model, layers=args.layers, heads=args.d_model // 64
    )
    layer = args.layers // 2
    direction = torch.randn(args.d_model)
    # threshold fired by ~5% of sampled tokens, computed with the transformers engine on the same weights
    fire_at = _quantile_threshold(
        TransformersEngine.load(path, name="calibration"), layer, direction, 0.95
    )
    options = default_vllm_options(block_size=BLOCK, max_num_seqs=max(32, args.streams))
    engine = VLLMEngine.load(path, name=f"random-d{args.d_model}", options=options)
    worker = EngineWorker()
    never = ProbeMonitor(
        "probe", layer, direction, -1e4, threshold=0.99, aggregation=AggregationSpec("ema", 0.5)
    )
    often = ProbeMonitor(
        "probe", layer, direction, 0.0, threshold=fire_at, aggregation=AggregationSpec("none")
    )
    kinds = {
        "unguarded": ([], default_controller_config(holdback_tokens=0)),
        "guarded (probe in vLLM's worker)": (
            [BoundMonitor(never)],
            default_controller_config(holdback_tokens=8),
        ),
    }
    for monitors, config in kinds.values():  # warm-up: first requests, monitor installation
        run_round(engine, worker, monitors, config, 2, 8, 0)
    counts = dict.fromkeys(kinds, 0)
    seconds = dict.fromkeys(kinds, 0.0)
    for r in range(args.rounds):
        for label, (monitors, config) in kinds.items():
            n, s, _ = run_round(
                engine, worker, monitors, config, args.streams, args.tokens, 100 * r
            )
            counts[label] += n
            seconds[label] += s
    print(
        f"model: random Llama d_model={args.d_model} layers={args.layers} on vLLM {engine.runner.rsplit('.', 1)[1]} "
        f"({'enforce_eager' if options.enforce_eager else 'compiled'}, prefix caching, "
        f"block {BLOCK}); probe at layer {layer}; {args.rounds} rounds x "
        f"{args.streams} concurrent streams x {args.tokens} tokens per kind, rounds alternating\n"
    )
    print("| run | tokens | wall seconds | tok/s |\n|---|---|---|---|")
    rates = {}
    for label in kinds:
        rates[label] = counts[label] / seconds[label]
        print(f"| {label} | {counts[label]} | {seconds[label]:.2f} | {rates[label]:.1f} |")
    guarded = list(kinds)[1]
    print(
        f"\nthroughput ratio guarded/unguarded: {rates[guarded] / rates['unguarded']:.3f} (target >= 0.97)\n"
    )

    s0 = dict(vars(engine.stats))
    config = default_controller_config(
        holdback_tokens=8, rollback="tokens", rollback_tokens=4, max_retries=6
    )
    _, _, fins = run_round(
        engine, worker, [BoundMonitor(often)], config, args.streams, args.tokens, 999
    )
    now = vars(engine.stats)
    resub = now["resubmissions"] - s0["resubmissions"]
    served = now["resubmitted_cached_tokens"] - s0["resubmitted_cached_tokens"]
    recomputed = now["refed_tokens"] - s0["refed_tokens"]
    outcomes = {o: sum(f.outcome == o for f in fins) for o in ("clean", "recovered", "refused")}
    print(
        "| rollbacks through vLLM (probe fires on ~5% of tokens, rollback 4 tokens) | count |\n|---|---|"
    )
    print(
        f"| generations clean / recovered / refused | {outcomes['clean']} / {outcomes['recovered']} / "
        f"{outcomes['refused']} |"
    )
    print(f"| rollbacks | {now['rollbacks'] - s0['rollbacks']} |")
    forced = now["forced_resets"] - s0["forced_resets"]
    print(f"| resets forced by the worker (reset token in vLLM's stream) | {forced} |")
    print(f"| resampling requests (prompt + accepted token ids) | {resub} |")
    print(f"| their tokens served by vLLM's prefix cache | {served} |")
    print(f"| their tokens recomputed | {recomputed} |")
    if resub:
        print(
            f"| recomputed per resampling request: mean (KV block = {BLOCK}) | "
            f"{recomputed / resub:.1f} |"
        )
    worker.stop()
    engine.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
