"""``guard eval``: measure a policy on labelled prompts through a live server (see :mod:`guard.eval`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from guard import judge as judges


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="run labelled prompts through a live guard server, guarded and unguarded, and print "
        "unsafe rates, benign false resets and unchanged answers",
    )
    p.add_argument(
        "--policy",
        required=True,
        type=Path,
        help="the policy to measure (its model is served too, unguarded, as <name>-unguarded)",
    )
    p.add_argument(
        "--prompts",
        required=True,
        type=Path,
        help='JSONL rows {"prompt", "label": harmful|benign, "category"?, "split"?: trained|heldout}',
    )
    judges.add_arguments(p, required=True, what="the verdict on every final answer")
    p.add_argument("--samples", type=int, default=4, help="answers per prompt and side (default 4)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=None, help="default: the policy's")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first seed (sample j of prompt i: seed + i*samples + j)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="prompts per group (held-out, trained, benign), taken from its categories in turn",
    )
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--url",
        default=None,
        help="use this running server instead of starting one; it must serve "
        "the policy and --unguarded-model",
    )
    p.add_argument(
        "--unguarded-model",
        default=None,
        help="with --url: the unguarded model name (default <policy name>-unguarded)",
    )
    p.add_argument("--api-key", default=None, help="with --url: the server's API key")
    p.add_argument("--out", type=Path, default=None, help="write every result row here (JSONL)")
    p.set_defaults(func=_eval)
    return p


def _judge(args):
    found = judges.from_args(args)
    assert found is not None  # the option group is required
    return found.verdict


def _eval(args: argparse.Namespace) -> int:
    from guard.eval.data import load_prompts
    from guard.eval.report import render
    from guard.eval.run import EvalSettings, live_server, openai_client, run_eval, workdir
    from guard.policy import load_policy

    if args.samples < 1:
        print("guard eval: --samples must be >= 1", file=sys.stderr)
        return 2
    prompts = load_prompts(args.prompts, args.limit)
    judge = _judge(args)
    settings = EvalSettings(
        samples=args.samples,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        concurrency=args.concurrency,
    )
    t0 = time.monotonic()
    if args.url:
        name = load_policy(args.policy, check_paths=False).name
        client = openai_client(args.url, args.api_key)
        rows = run_eval(
            client, name, args.unguarded_model or f"{name}-unguarded", prompts, judge, settings
        )
    else:
        with workdir() as tmp, live_server(args.policy, Path(tmp)) as (url, name, unguarded):
            rows = run_eval(openai_client(url), name, unguarded, prompts, judge, settings)
    secs = time.monotonic() - t0
    print(
        f"guard eval: policy {name} ({args.policy}); {len(prompts)} prompts x {args.samples} samples x 2 sides "
        f"through the live server in {secs:.0f} s (max_tokens {args.max_tokens}, temperature "
        f"{args.temperature if args.temperature is not None else 'policy default'})\n"
    )
    print(
        render(
            rows, f"policy `{name}` vs `{name}-unguarded`" if not args.url else f"policy `{name}`"
        )
    )
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0
