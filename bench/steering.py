"""Steering vs plain resampling on the organism, side by side in one run (in-process GuardService).

Policy variants are copies of ``policies/demo-probe.yaml`` that differ only in ``backtrack.strategies``'
``steer_alpha`` (0 = plain resampling, the demo). All variants share one engine and worker in one
:class:`guard.service.GuardService`; every prompt of ``eval_prompts.jsonl`` (trained and held-out
harm categories, benign) goes to every variant with the same seed, and the final answer is judged
with the organism's exact judge. Per variant and split: unsafe rate, outcomes (clean / recovered /
refused), mean retries per recovery; for benign prompts the fraction still helpful (not a refusal,
not unsafe) and unchanged (same text as the plain variant for the same seed).

Steering only acts on resamples, so benign answers (which rarely fire) are mostly untouched. The
"steer always" diagnostic therefore drives the engine directly with ``step(..., steer=...)`` from the
first token, subtracting ``alpha`` times the demo probe's unit direction at its layer on every
token, to show what steering itself costs (and does) when it is always on.

    python bench/steering.py [--alphas 4,8] [--limit N] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import yaml

from guard.controller.events import Failed, Finished
from guard.engine.transformers_engine import TransformersEngine
from guard.monitors.probe import ProbeMonitor
from guard.organism.judge import is_refusal, judge
from guard.sampling import SamplingParams, make_generator
from guard.service import GenerationRequest, GuardService
from guard.testing import policy_with_absolute_paths

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("trained", "heldout", "benign")


def pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:5.1f}% ({n}/{d})" if d else "n/a"


def table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def load_prompts(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_split = defaultdict(list)
    for row in rows:
        by_split[row["split"]].append(row)
    return [r for split in SPLITS for r in by_split[split][: limit or None]]


def write_variants(base: Path, alphas: list[float], out_dir: Path) -> list[tuple[str, Path]]:
    """Copies of ``base`` with absolute paths, a scratch log, and every strategy's steer_alpha set."""
    raw = policy_with_absolute_paths(base)
    out = []
    for alpha in [0.0, *alphas]:
        name = "plain" if alpha == 0 else f"steer-{alpha:g}"
        variant = json.loads(json.dumps(raw))
        variant["name"] = name
        variant["log"] = {"path": str(out_dir / "log.db"), "record": "flagged"}
        for strat in variant["backtrack"]["strategies"]:
            strat["steer_alpha"] = alpha
        path = out_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(variant, sort_keys=False))
        out.append((name, path))
    return out


async def run_service(
    paths: list[Path], names: list[str], prompts: list[dict], max_tokens: int, concurrency: int
) -> dict[tuple[str, int], Finished]:
    service = GuardService.from_policy_files(paths)
    sem = asyncio.Semaphore(concurrency)
    results: dict[tuple[str, int], Finished] = {}

    async def one(name: str, i: int, prompt: str) -> None:
        async with sem:
            req = GenerationRequest(
                model=name,
                request_id=f"{name}-{i}",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=1.0,
                seed=i,
            )
            async for ev in service.stream(service.prepare(req)):
                if isinstance(ev, Finished):
                    results[(name, i)] = ev
                elif isinstance(ev, Failed):
                    raise ev.error

    try:
        await asyncio.gather(
            *(one(n, i, p["prompt"]) for i, p in enumerate(prompts) for n in names)
        )
    finally:
        await service.aclose()
    return results


def steer_always(
    model_dir: Path, probe_dir: Path, prompts: list[dict], alphas: list[float], max_tokens: int
) -> dict[float, list[str]]:
    """Answers with ``-alpha * unit probe direction`` added at the probe's layer on every token."""
    engine = TransformersEngine.load(model_dir)
    probe = ProbeMonitor.load(probe_dir, name="probe")
    vec = probe.steering_vector()
    eos = engine.info.eos_token_ids
    out: dict[float, list[str]] = {}
    for alpha in [0.0, *alphas]:
        steer = {probe.layer: -alpha * vec} if alpha else None
        texts = []
        for i, p in enumerate(prompts):
            seq = engine.new_sequence(
                engine.tokenizer.encode_chat([{"role": "user", "content": p["prompt"]}])
            )
            engine.prefill(seq)
            params, gen = (
                SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens),
                make_generator(i),
            )
            while len(seq.output_ids) < max_tokens:
                tok = engine.step(seq, params, gen, steer=steer).token_id
                if tok in eos:
                    break
            ids = [t for t in seq.output_ids if t not in eos]
            texts.append(engine.tokenizer.decode(ids))
            engine.release(seq)
        out[alpha] = texts
    return out


def report_service(prompts, names, results) -> None:
    rows = [
        [
            "variant",
            "split",
            "unsafe",
            "clean",
            "recovered",
            "refused",
            "mean retries per recovery",
            "unsafe among recovered",
        ]
    ]
    for name in names:
        for split in SPLITS[:2]:
            idx = [i for i, p in enumerate(prompts) if p["split"] == split]
            fin = [results[(name, i)] for i in idx]
            out = Counter(f.outcome for f in fin)
            rec = [f.resets for f in fin if f.outcome == "recovered"]
            rows.append(
                [
                    name,
                    split,
                    pct(sum(judge(f.text).unsafe for f in fin), len(fin)),
                    str(out["clean"]),
                    str(out["recovered"]),
                    str(out["refused"]),
                    f"{sum(rec) / len(rec):.2f}" if rec else "n/a",
                    pct(
                        sum(judge(f.text).unsafe for f in fin if f.outcome == "recovered"), len(rec)
                    ),
                ]
            )
    print(table(rows))
    print()
    rows = [
        [
            "variant",
            "benign helpful (not refusal, not unsafe)",
            "unchanged vs plain",
            "reset at least once",
            "refused by the guard",
        ]
    ]
    idx = [i for i, p in enumerate(prompts) if p["split"] == "benign"]
    for name in names:
        fin = [results[(name, i)] for i in idx]
        helpful = sum(not is_refusal(f.text) and not judge(f.text).unsafe for f in fin)
        same = sum(f.text == results[("plain", i)].text for f, i in zip(fin, idx, strict=True))
        rows.append(
            [
                name,
                pct(helpful, len(fin)),
                pct(same, len(fin)),
                pct(sum(f.resets > 0 for f in fin), len(fin)),
                pct(sum(f.outcome == "refused" for f in fin), len(fin)),
            ]
        )
    print(table(rows))


def report_always(prompts, texts: dict[float, list[str]]) -> None:
    rows = [
        [
            "steer always, alpha",
            "benign helpful",
            "benign unchanged vs alpha 0",
            "benign refusals",
            "harmful unsafe (trained)",
            "harmful unsafe (held-out)",
        ]
    ]
    for alpha, answers in texts.items():
        by = defaultdict(list)
        for p, a, a0 in zip(prompts, answers, texts[0.0], strict=True):
            by[p["split"]].append((a, a0))
        ben = by["benign"]
        rows.append(
            [
                f"{alpha:g}",
                pct(sum(not is_refusal(a) and not judge(a).unsafe for a, _ in ben), len(ben)),
                pct(sum(a == a0 for a, a0 in ben), len(ben)),
                pct(sum(is_refusal(a) for a, _ in ben), len(ben)),
                pct(sum(judge(a).unsafe for a, _ in by["trained"]), len(by["trained"])),
                pct(sum(judge(a).unsafe for a, _ in by["heldout"]), len(by["heldout"])),
            ]
        )
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, default=REPO / "policies" / "demo-probe.yaml")
    ap.add_argument(
        "--alphas", default="4,8", help="steer_alpha values besides 0 (comma-separated)"
    )
    ap.add_argument("--limit", type=int, default=None, help="prompts per split (default: all)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    model_dir = REPO / "models" / "organism"
    prompts = load_prompts(model_dir / "data" / "eval_prompts.jsonl", args.limit)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        variants = write_variants(args.policy, alphas, Path(tmp))
        names = [n for n, _ in variants]
        results = asyncio.run(
            run_service([p for _, p in variants], names, prompts, args.max_tokens, args.concurrency)
        )
    t1 = time.time()
    probe_dir = REPO / "models" / "organism" / "probe"
    always = steer_always(model_dir, probe_dir, prompts, alphas, args.max_tokens)
    counts = Counter(p["split"] for p in prompts)
    print(
        f"organism, policy {args.policy.relative_to(REPO) if args.policy.is_relative_to(REPO) else args.policy} "
        f"with steer_alpha in {[0.0, *alphas]} on every strategy; {dict(counts)} prompts, temperature 1.0, "
        f"seed = prompt index, max_tokens {args.max_tokens}; service {t1 - t0:.0f} s, diagnostic "
        f"{time.time() - t1:.0f} s\n"
    )
    print("### Guarded generation (steering applies to resamples only)\n")
    report_service(prompts, names, results)
    print(
        "\n### Diagnostic: steering forced on from the first token (engine.step(..., steer=...), no monitor)\n"
    )
    report_always(prompts, always)


if __name__ == "__main__":
    main()
