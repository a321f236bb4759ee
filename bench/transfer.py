"""The whole user path with defaults only, on a model: what a new user gets from the CLI alone.

1. ``guard probe train --model M --data TRAIN --out DIR/probe`` with every other option at its default;
2. a policy naming that probe and nothing else (default backtracking, default streaming);
3. ``guard eval`` of that policy on labelled prompts with a judge, through a live server.

Nothing is adjusted between the steps, so the printed tables are what the defaults give.
``--judge-calibration`` adds one non-default option to step 1: the same judge as step 3, given to
``guard probe train --judge``, which drops the sampled calibration answers it calls unsafe.

    python bench/transfer.py --model models/organism2 --judge MODULE:FUNCTION [--engine vllm] [--samples 4]
        [--train M/data/probe_train.jsonl] [--prompts M/data/eval_prompts.jsonl] [--limit N]
        [--trained-limit N] [--out DIR] [--judge-calibration]

``--limit`` / ``--trained-limit``: prompts per group (trained categories: ``--trained-limit``, default
``--limit``), taken from each group's categories in turn (:func:`guard.eval.data.load_prompts`) and
written to ``DIR/prompts.jsonl``, which ``guard eval`` then reads whole.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from guard.eval.data import load_prompts

REPO = Path(__file__).resolve().parent.parent


def guard(*args: str) -> None:
    """Run one ``guard`` command as a user would, echoing it and its output."""
    cmd = [sys.executable, "-m", "guard.cli", *args]
    print("$ guard " + " ".join(args), flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"({time.monotonic() - t0:.0f} s)\n", flush=True)


def user_policy(out: Path, model: Path, engine: str) -> Path:
    data = {
        "name": f"{model.name}-defaults",
        "model": {"engine": engine, "path": str(model.resolve())},
        "monitors": [
            {"name": "harm-probe", "kind": "probe", "path": str((out / "probe").resolve())}
        ],
        "log": {"path": str((out / "guard.db").resolve())},
    }
    path = out / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"policy {path}:\n{path.read_text()}", flush=True)
    return path


def subset(prompts: Path, out: Path, limit: int | None, trained: int | None) -> Path:
    """The prompts ``guard eval`` runs: ``limit`` per group, ``trained`` of the trained categories."""
    if limit is None and trained is None:
        return prompts
    rows = [r for r in load_prompts(prompts, limit) if r.group != "trained"]
    rows += [
        r
        for r in load_prompts(prompts, trained if trained is not None else limit)
        if r.group == "trained"
    ]
    path = out / "prompts.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": r.prompt,
                    "label": "harmful" if r.harmful else "benign",
                    "category": r.category,
                    "split": None if r.group == "benign" else r.group,
                }
            )
            + "\n"
            for r in rows
        )
    )
    print(
        f"prompts: {path} ({sum(r.group == 'heldout' for r in rows)} held-out-category, "
        f"{sum(r.group == 'trained' for r in rows)} trained-category, {sum(r.group == 'benign' for r in rows)} "
        f"benign, from {prompts})",
        flush=True,
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--judge", required=True, help="module:function for guard eval --judge")
    ap.add_argument(
        "--train", type=Path, default=None, help="default: MODEL/data/probe_train.jsonl"
    )
    ap.add_argument(
        "--prompts", type=Path, default=None, help="default: MODEL/data/eval_prompts.jsonl"
    )
    ap.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="prompts per group for guard eval")
    ap.add_argument(
        "--trained-limit",
        type=int,
        default=None,
        help="trained-category prompts (default: --limit)",
    )
    ap.add_argument("--out", type=Path, default=None, help="keep probe, policy and results here")
    ap.add_argument(
        "--probe", type=Path, default=None, help="reuse a probe trained by an earlier run's step 1"
    )
    ap.add_argument(
        "--judge-calibration",
        action="store_true",
        help="also give --judge to guard probe train (drops calibration answers it calls unsafe)",
    )
    args = ap.parse_args()
    train = args.train or args.model / "data" / "probe_train.jsonl"
    prompts = args.prompts or args.model / "data" / "eval_prompts.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.probe is None:
            guard(
                "probe",
                "train",
                "--model",
                str(args.model),
                "--data",
                str(train),
                "--out",
                str(out / "probe"),
                *(["--judge", args.judge] if args.judge_calibration else []),
            )
        elif args.probe.resolve() != (out / "probe").resolve():
            (out / "probe").symlink_to(args.probe.resolve())
        policy = user_policy(out, args.model, args.engine)
        prompts = subset(prompts, out, args.limit, args.trained_limit)
        guard(
            "eval",
            "--policy",
            str(policy),
            "--prompts",
            str(prompts),
            "--judge",
            args.judge,
            "--samples",
            str(args.samples),
            "--out",
            str(out / "results.jsonl"),
        )


if __name__ == "__main__":
    main()
