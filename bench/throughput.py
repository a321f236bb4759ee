"""Throughput guarded vs unguarded, side by side in one run, plus forward-token accounting.

Builds a random-weight Llama with d_model >= 1024 (no download), then runs the same batch of
concurrent generations through the engine worker twice per round, alternating:

- unguarded: the controller with no monitor and no hold-back;
- guarded: a linear probe on one layer (random direction, calibrated so it never fires, since
  throughput is what is measured here) with EMA aggregation and an 8-token hold-back.

It prints tokens/s for both and their ratio. A third run uses a probe that fires on every token,
so every generation is rolled back until refused, and prints the engine's forward-token
counters: prompt tokens fed == the sum of the prompt lengths, i.e. rollbacks re-ran no prompt token.

    python bench/throughput.py [--d-model 1024] [--layers 4] [--streams 8] [--tokens 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import torch

from guard.controller.backtrack import BoundMonitor, ControllerConfig, GuardedGeneration
from guard.controller.events import Finished
from guard.controller.record import GenerationRecord
from guard.engine.transformers_engine import TransformersEngine
from guard.engine.worker import EngineWorker
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.sampling import SamplingParams
from guard.testing import make_random_llama

PROMPTS = ["Tell me about the weather.", "How do I bake bread?", "Write a short poem.", "What is a CPU?"]


def run_batch(engine, worker, monitors, config, streams, tokens, seed0):
    """Run ``streams`` concurrent generations; return (completion tokens, seconds, finished events)."""
    done = threading.Semaphore(0)
    finished = []

    def emit(ev):
        if isinstance(ev, Finished):
            finished.append(ev)
            done.release()

    t0 = time.perf_counter()
    for i in range(streams):
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        rec = GenerationRecord(request_id=f"b{i}", policy_name="bench", policy_hash="", model=engine.info.name,
                               messages=None, prompt=None, prompt_tokens=len(prompt))
        params = SamplingParams(seed=seed0 + i, max_tokens=tokens, banned_token_ids=engine.info.eos_token_ids)
        worker.submit(GuardedGeneration(engine, prompt, params, monitors, config, rec, emit))
    for _ in range(streams):
        done.acquire()
    return sum(f.usage.generated_tokens for f in finished), time.perf_counter() - t0, finished


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_llama(tmp + "/m", hidden=args.d_model, layers=args.layers, heads=args.d_model // 64)
        engine = TransformersEngine.load(path, name=f"random-d{args.d_model}")
    worker = EngineWorker()
    layer = args.layers // 2
    direction = torch.randn(args.d_model)
    never = ProbeMonitor("probe", layer, direction, -1e4, threshold=0.99, aggregation=AggregationSpec("ema", 0.5))
    always = ProbeMonitor("probe", layer, direction, 1e4, threshold=0.5, aggregation=AggregationSpec("none"))
    plain_cfg = ControllerConfig(holdback_tokens=0)
    guard_cfg = ControllerConfig(holdback_tokens=8, rollback="sentence", max_retries=3)

    run_batch(engine, worker, [], plain_cfg, 2, 8, 0)  # warm-up
    totals = {"unguarded": [0, 0.0], "guarded (probe, 1 layer)": [0, 0.0]}
    for r in range(args.rounds):
        for label, mons, cfg in (("unguarded", [], plain_cfg),
                                 ("guarded (probe, 1 layer)", [BoundMonitor(never)], guard_cfg)):
            n, secs, _ = run_batch(engine, worker, mons, cfg, args.streams, args.tokens, 100 * r)
            totals[label][0] += n
            totals[label][1] += secs
    print(f"model: random Llama d_model={args.d_model} layers={args.layers}, probe at layer {layer}; "
          f"{args.streams} concurrent streams x {args.tokens} tokens x {args.rounds} rounds (alternating)\n")
    print(f"| {'run':<26} | {'tokens':>7} | {'seconds':>8} | {'tok/s':>8} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 10}|{'-' * 10}|")
    rates = {}
    for label, (n, secs) in totals.items():
        rates[label] = n / secs
        print(f"| {label:<26} | {n:>7} | {secs:>8.2f} | {n / secs:>8.1f} |")
    ratio = rates["guarded (probe, 1 layer)"] / rates["unguarded"]
    print(f"\nthroughput ratio guarded/unguarded: {ratio:.3f} (target >= 0.97)\n")

    before = engine.stats.prompt_tokens, engine.stats.rollbacks, engine.stats.output_tokens, engine.stats.refed_tokens
    n, secs, fins = run_batch(engine, worker, [BoundMonitor(always)], guard_cfg, args.streams, args.tokens, 999)
    prompt_lens = sum(f.usage.prompt_tokens for f in fins)
    s = engine.stats
    print("| forward-token accounting (probe fires on every token) | count |")
    print("|---|---|")
    print(f"| generations (all refused after {guard_cfg.max_retries} retries) | "
          f"{sum(f.outcome == 'refused' for f in fins)}/{len(fins)} |")
    print(f"| rollbacks | {s.rollbacks - before[1]} |")
    print(f"| sum of prompt lengths | {prompt_lens} |")
    print(f"| prompt tokens fed through the model | {s.prompt_tokens - before[0]} |")
    print(f"| prompt tokens re-run by rollbacks | {s.prompt_tokens - before[0] - prompt_lens} |")
    print(f"| output tokens fed | {s.output_tokens - before[2]} |")
    print(f"| output tokens re-fed after a rollback | {s.refed_tokens - before[3]} |")
    worker.stop()


if __name__ == "__main__":
    main()
