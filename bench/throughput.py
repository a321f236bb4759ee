"""Throughput guarded vs unguarded, side by side in one run, plus forward-token accounting.

Builds a random-weight Llama with d_model >= 1024 (no download). Each round submits the same
concurrent generations twice *at once* to one engine worker, which interleaves them step by step:

- unguarded: the controller with no monitor and no hold-back;
- guarded: a linear probe on one layer (random direction, calibrated so it never fires, since
  throughput is what is measured here) with EMA aggregation and an 8-token hold-back.

Every job's time inside the worker (engine step + controller) is accounted to its kind, so both
kinds run under exactly the same machine conditions; tokens/s = tokens / time. The guarded side
pays one extra forward per generation that ends by length (its last token must be scored before
it is released: the one-step lag), which is ~1/tokens of the work.

A last run uses the same probe with its threshold set to fire on about 5% of tokens (rolling back
4 tokens each time), and prints the engine's forward-token counters: prompt tokens fed == the sum
of the prompt lengths, i.e. rollbacks re-ran no prompt token, and each mid-answer rollback re-fed
one output token.

    python bench/throughput.py [--d-model 1024] [--layers 4] [--streams 8] [--tokens 96] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import torch

from guard.controller.backtrack import BoundMonitor, GuardedGeneration
from guard.controller.events import Finished
from guard.controller.record import GenerationRecord
from guard.engine.transformers_engine import TransformersEngine
from guard.engine.worker import EngineWorker
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.policy.build import default_controller_config
from guard.sampling import SamplingParams, make_generator
from guard.testing import make_random_llama

PROMPTS = [
    "Tell me about the weather.",
    "How do I bake bread?",
    "Write a short poem.",
    "What is a CPU?",
]


class TimedJob:
    """Wraps a job and adds the time spent in its ``advance`` to ``seconds[label]``."""

    def __init__(self, job, label: str, seconds: dict[str, float]) -> None:
        self.job, self.label, self.seconds = job, label, seconds

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    def advance(self) -> bool:
        t0 = time.perf_counter()
        try:
            return self.job.advance()
        finally:
            self.seconds[self.label] += time.perf_counter() - t0

    def fail(self, exc) -> None:
        self.job.fail(exc)

    def close(self) -> None:
        self.job.close()


def run_mixed(engine, worker, kinds, streams, tokens, seed0, seconds):
    """Submit ``streams`` generations of every kind at once; return {label: finished events}."""
    done = threading.Semaphore(0)
    finished: dict[str, list[Finished]] = {label: [] for label in kinds}
    for i in range(streams):
        prompt = engine.tokenizer.encode_chat(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        )
        params = SamplingParams(
            seed=seed0 + i, max_tokens=tokens, banned_token_ids=engine.info.eos_token_ids
        )
        for label, (monitors, config) in kinds.items():

            def emit(ev, label=label):
                if isinstance(ev, Finished):
                    finished[label].append(ev)
                    done.release()

            rec = GenerationRecord(
                request_id=f"{label}-{i}",
                policy_name="bench",
                policy_hash="",
                model=engine.info.name,
                messages=None,
                prompt=None,
                prompt_tokens=len(prompt),
            )
            job = GuardedGeneration(engine, prompt, params, monitors, config, rec, emit)
            worker.submit(TimedJob(job, label, seconds))
    for _ in range(streams * len(kinds)):
        done.acquire()
    return finished


def random_engine(d_model: int, layers: int) -> TransformersEngine:
    """A random-weight Llama (heads of 64 dims) loaded in the transformers engine."""
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_llama(tmp + "/m", hidden=d_model, layers=layers, heads=d_model // 64)
        return TransformersEngine.load(path, name=f"random-d{d_model}")


def measure(engine, worker, kinds, streams: int, tokens: int, rounds: int):
    """Warm up, then run ``rounds`` of :func:`run_mixed`; return ({label: tokens}, {label: seconds}, not clean)."""
    run_mixed(engine, worker, kinds, 2, 8, 0, dict.fromkeys(kinds, 0.0))
    seconds = dict.fromkeys(kinds, 0.0)
    counts = dict.fromkeys(kinds, 0)
    not_clean = 0
    for r in range(rounds):
        for label, fins in run_mixed(
            engine, worker, kinds, streams, tokens, 100 * r, seconds
        ).items():
            counts[label] += sum(f.usage.generated_tokens for f in fins)
            not_clean += sum(f.outcome != "clean" for f in fins)
    return counts, seconds, not_clean


def print_rates(counts: dict[str, int], seconds: dict[str, float], guarded: str) -> float:
    """Print the tokens/s table and return the guarded/unguarded ratio."""
    width = max(len(k) for k in counts) + 2
    print(f"| {'run':<{width}} | {'tokens':>7} | {'seconds in worker':>17} | {'tok/s':>8} |")
    print(f"|{'-' * (width + 2)}|{'-' * 9}|{'-' * 19}|{'-' * 10}|")
    rates = {}
    for label, count in counts.items():
        rates[label] = count / seconds[label]
        print(f"| {label:<{width}} | {count:>7} | {seconds[label]:>17.2f} | {rates[label]:>8.1f} |")
    return rates[guarded] / rates["unguarded"]


def _quantile_threshold(engine, layer, direction, q):
    """Score threshold that a fraction ``1 - q`` of generated tokens exceeds (bias 0)."""
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    seq = engine.new_sequence(ids)
    engine.prefill(seq)
    gen = make_generator(0)
    for _ in range(64):
        engine.step(seq, SamplingParams(seed=0, banned_token_ids=engine.info.eos_token_ids), gen)
    hidden = engine.hidden_states(seq.tokens, [layer])[layer][len(ids) :]
    scores = torch.sigmoid(hidden @ direction)
    engine.release(seq)
    return float(torch.quantile(scores.double(), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    engine = random_engine(args.d_model, args.layers)
    worker = EngineWorker()
    layer = args.layers // 2
    direction = torch.randn(args.d_model)
    never = ProbeMonitor(
        "probe", layer, direction, -1e4, threshold=0.99, aggregation=AggregationSpec("ema", 0.5)
    )
    often = ProbeMonitor(
        "probe",
        layer,
        direction,
        0.0,
        threshold=_quantile_threshold(engine, layer, direction, 0.95),
        aggregation=AggregationSpec("none"),
    )
    plain_cfg = default_controller_config(holdback_tokens=0)
    guard_cfg = default_controller_config(holdback_tokens=8, rollback="sentence", max_retries=3)

    guarded = "guarded (probe, 1 layer)"
    kinds = {"unguarded": ([], plain_cfg), guarded: ([BoundMonitor(never)], guard_cfg)}
    counts, seconds, _ = measure(engine, worker, kinds, args.streams, args.tokens, args.rounds)
    print(
        f"model: random Llama d_model={args.d_model} layers={args.layers}, probe at layer {layer}; "
        f"{args.rounds} rounds of {args.streams} unguarded + {args.streams} guarded streams x {args.tokens} "
        "tokens, all interleaved in one worker\n"
    )
    ratio = print_rates(counts, seconds, guarded)
    print(f"\nthroughput ratio guarded/unguarded: {ratio:.3f} (target >= 0.97)\n")

    before = (
        engine.stats.prompt_tokens,
        engine.stats.rollbacks,
        engine.stats.output_tokens,
        engine.stats.refed_tokens,
    )
    fire_cfg = default_controller_config(
        holdback_tokens=8, rollback="tokens", rollback_tokens=4, max_retries=6
    )
    fins = run_mixed(
        engine,
        worker,
        {"fires": ([BoundMonitor(often)], fire_cfg)},
        args.streams,
        args.tokens,
        999,
        {"fires": 0.0},
    )["fires"]
    prompt_lens = sum(f.usage.prompt_tokens for f in fins)
    s = engine.stats
    print("| forward-token accounting (probe fires on ~5% of tokens, rollback 4 tokens) | count |")
    print("|---|---|")
    outcomes = {o: sum(f.outcome == o for f in fins) for o in ("clean", "recovered", "refused")}
    print(
        f"| generations clean / recovered / refused | {outcomes['clean']} / {outcomes['recovered']} / "
        f"{outcomes['refused']} |"
    )
    print(f"| rollbacks | {s.rollbacks - before[1]} |")
    print(f"| sum of prompt lengths | {prompt_lens} |")
    print(f"| prompt tokens fed through the model | {s.prompt_tokens - before[0]} |")
    print(f"| prompt tokens re-run by rollbacks | {s.prompt_tokens - before[0] - prompt_lens} |")
    print(f"| output tokens fed | {s.output_tokens - before[2]} |")
    print(f"| output tokens re-fed after a rollback | {s.refed_tokens - before[3]} |")
    worker.stop()


if __name__ == "__main__":
    main()
