"""Safety of the organism through the live server: unguarded vs guarded, side by side in one run.

A thin use of ``guard eval`` (:mod:`guard.eval`): starts ``guard serve`` with the guarded
policies and their baselines over the same model, streams every evaluation prompt of the organism
to both with the same seeds through the official ``openai`` client, judges each final answer with
the organism's exact judge (``guard.organism.judge:judge``) and prints ``guard eval``'s tables per
guarded policy: unsafe rate unguarded vs guarded per group (held-out categories, trained
categories, benign), benign false resets and unchanged answers, outcomes, and ``recovered``
answers the judge calls unsafe.

A guarded policy is compared with the ``--unguarded`` baseline, or with its own when given as
``--guarded GUARDED.yaml:BASELINE.yaml`` (same engine on both sides, e.g. ``demo-probe-vllm`` vs
``unguarded-vllm``: each engine samples with its own random streams, so only same-engine answers can
be compared token for token). For one policy and its derived unguarded twin, ``guard eval`` itself
is the shorter command.

    python bench/safety.py [--guarded P[:BASELINE] ...] [--limit N] [--samples 1] [--concurrency 8] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from guard.eval.data import load_prompts
from guard.eval.report import render
from guard.eval.run import EvalSettings, openai_client, run_eval
from guard.judge import from_callable
from guard.policy import load_policy
from guard.testing import serve_in_subprocess

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "models" / "organism")
    ap.add_argument(
        "--guarded",
        action="append",
        help="guarded policy, optionally with its own baseline as GUARDED:BASELINE (repeatable; "
        "default policies/demo.yaml)",
    )
    ap.add_argument("--unguarded", type=Path, default=REPO / "policies" / "unguarded.yaml")
    ap.add_argument("--limit", type=int, default=None, help="prompts per split (default: all)")
    ap.add_argument(
        "--samples", type=int, default=1, help="answers per prompt and policy (default 1)"
    )
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()

    prompts = load_prompts(args.model_dir / "data" / "eval_prompts.jsonl", args.limit)
    pairs = [
        (Path(g.split(":")[0]), Path(g.split(":")[1]) if ":" in g else args.unguarded)
        for g in (args.guarded or [str(REPO / "policies" / "demo.yaml")])
    ]
    files = list(dict.fromkeys(p for pair in pairs for p in pair))
    named = [(load_policy(g).name, load_policy(b).name) for g, b in pairs]
    settings = EvalSettings(
        samples=args.samples,
        max_tokens=args.max_tokens,
        temperature=1.0,
        concurrency=args.concurrency,
    )
    judge = from_callable("guard.organism.judge:judge")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = serve_in_subprocess(files, Path(tmp) / "server.log", timeout=600)
        try:
            client = openai_client(url, "bench")
            t0 = time.time()
            for name, base in named:
                results[name] = run_eval(client, name, base, prompts, judge, settings)
            secs = time.time() - t0
        finally:
            proc.terminate()
            proc.wait(30)
    where = (
        args.model_dir.relative_to(REPO) if args.model_dir.is_relative_to(REPO) else args.model_dir
    )
    print(
        f"organism: {where}; {len(prompts)} prompts x {args.samples} samples x {len(named)} policy pairs "
        f"through the live server in {secs:.0f} s (temperature 1.0, max_tokens {args.max_tokens}, "
        f"{args.concurrency} concurrent)"
    )
    for name, base in named:
        print()
        print(render(results[name], f"guarded policy `{name}` vs `{base}`"))
    out = os.environ.get("GUARD_BENCH_OUT")
    if out:
        Path(out).write_text(
            "".join(
                json.dumps({"policy": n, **r}) + "\n" for n, rows in results.items() for r in rows
            )
        )


if __name__ == "__main__":
    main()
