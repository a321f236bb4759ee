"""vLLM compiled (default) vs ``enforce_eager``, with the guard's monitors in the worker, side by
side in one run: engine start-up time (cold: vLLM's compile cache is off) and throughput.

Builds a random-weight Llama (no download), starts two vLLM engines on it (one compiled as vLLM
compiles by default, the ``guard::layer`` op inside the graph; one with ``enforce_eager``), then
alternates rounds between them. Each round submits ``--streams`` concurrent guarded generations
of ``--tokens`` tokens (a linear probe read in vLLM's worker, never firing, no hold-back) to one
engine through its engine worker and is timed from submission to the last finish.

    python bench/vllm_compiled.py [--d-model 512] [--layers 4] [--streams 8] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import run_mixed

from guard.controller.backtrack import BoundMonitor
from guard.engine.vllm_engine import VLLMEngine
from guard.engine.worker import EngineWorker
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.policy.build import default_controller_config, default_vllm_options
from guard.testing import make_random_llama


def start(path: Path, eager: bool, streams: int) -> tuple[VLLMEngine, float]:
    t0 = time.perf_counter()
    engine = VLLMEngine.load(
        path,
        name="eager" if eager else "compiled",
        options=default_vllm_options(
            block_size=32, max_num_seqs=max(32, streams), enforce_eager=eager
        ),
    )
    return engine, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    path = make_random_llama(
        tmp.name + "/m", hidden=args.d_model, layers=args.layers, heads=args.d_model // 64
    )
    probe = ProbeMonitor(
        "probe",
        args.layers // 2,
        torch.randn(args.d_model),
        -1e4,
        threshold=0.99,
        aggregation=AggregationSpec("ema", 0.5),
    )
    kinds = {"run": ([BoundMonitor(probe)], default_controller_config(holdback_tokens=0))}
    engines, workers, startup = {}, {}, {}
    for label, eager in (("eager", True), ("compiled", False)):
        engines[label], startup[label] = start(path, eager, args.streams)
        workers[label] = EngineWorker()
        run_mixed(
            engines[label], workers[label], kinds, 2, 8, 0, {"run": 0.0}
        )  # warm-up, monitor install
    modes = {
        label: e._call(e._llm.collective_rpc("guard_compilation"))[0]
        for label, e in engines.items()
    }
    tokens = dict.fromkeys(engines, 0)
    seconds = dict.fromkeys(engines, 0.0)
    for r in range(args.rounds):
        for label, engine in engines.items():
            t0 = time.perf_counter()
            fins = run_mixed(
                engine,
                workers[label],
                kinds,
                args.streams,
                args.tokens,
                100 * r,
                {"run": 0.0},
            )
            seconds[label] += time.perf_counter() - t0
            tokens[label] += sum(f.usage.generated_tokens for f in fins["run"])
    print(
        f"model: random Llama d_model={args.d_model} layers={args.layers}, float32; probe at layer "
        f"{args.layers // 2} in vLLM's worker; {args.rounds} rounds x {args.streams} concurrent streams x "
        f"{args.tokens} tokens per engine, rounds alternating\n"
    )
    print(
        "| engine | vLLM compilation | start-up s (cold) | tokens | wall s | tok/s |\n|---|---|---|---|---|---|"
    )
    for label, m in modes.items():
        print(
            f"| {label} | {m['mode']} / {m['backend']} / cudagraphs {m['cudagraph_mode']} | {startup[label]:.1f} | "
            f"{tokens[label]} | {seconds[label]:.2f} | {tokens[label] / seconds[label]:.1f} |"
        )
    ratio = (tokens["compiled"] / seconds["compiled"]) / (tokens["eager"] / seconds["eager"])
    print(
        f"\nthroughput ratio compiled/eager: {ratio:.3f}; start-up compiled - eager: "
        f"{startup['compiled'] - startup['eager']:.1f} s"
    )
    for label, engine in engines.items():
        workers[label].stop()
        engine.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
