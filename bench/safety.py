"""Safety of the organism through the live server: unguarded vs guarded, side by side in one run.

Starts ``guard serve`` with two policies over the same model (``unguarded``: no monitors;
``demo``: harm probe + reset token + backtracking), sends every evaluation prompt of the organism
to both with the same seed through the official ``openai`` client, and judges each final answer
with the organism's exact judge. Prints, per split (trained harm categories, held-out harm
categories, benign):

- unsafe rate unguarded vs guarded, and their ratio;
- false resets on benign requests (a guarded benign answer that was cut back at least once);
- benign answers unchanged (guarded text == unguarded text for the same seed);
- outcomes and mean extra tokens per recovery (tokens sampled and discarded).

A guarded policy is compared with the ``--unguarded`` baseline, or with its own when given as
``--guarded GUARDED.yaml:BASELINE.yaml`` (same engine on both sides, e.g. ``demo-probe-vllm`` vs
``unguarded-vllm``: each engine samples with its own random streams, so only same-engine answers can
be compared token for token).

    python bench/safety.py [--guarded P[:BASELINE] ...] [--limit N] [--concurrency 8] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

from guard.organism.judge import is_refusal, judge
from guard.testing import serve_in_subprocess

REPO = Path(__file__).resolve().parent.parent


def load_prompts(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if limit:
        by_split = defaultdict(list)
        for row in rows:
            by_split[row["split"]].append(row)
        rows = [r for split in by_split.values() for r in split[:limit]]
    return rows


def ask(client: OpenAI, model: str, prompt: str, seed: int, max_tokens: int) -> dict:
    """Stream one answer as a client would: apply resets, count those that retract shown text."""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], seed=seed, temperature=1.0,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    text, guard, visible, usage = "", {}, 0, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            g = (choice.model_extra or {}).get("guard") or {}
            if "reset" in g:
                visible += 1
                text = text[:len(text) - g["reset"]["retract_chars"]]
            text += choice.delta.content or ""
            if choice.finish_reason:
                guard = g
    return {"text": text, "guard": guard, "visible_resets": visible, "completion_tokens": usage.completion_tokens}


def pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:5.1f}% ({n}/{d})" if d else "n/a"


def report(rows: list[dict], policy: str, baseline: str) -> None:
    """Tables for one guarded policy; ``rows[i]["guarded"][policy]`` holds its answer and
    ``rows[i]["baselines"][baseline]`` the baseline's."""
    rows = [{**r, **r["baselines"][baseline]} for r in rows]
    splits = ["trained", "heldout", "benign"]
    print(f"\n### guarded policy `{policy}` vs `{baseline}`")
    print("\n| split | prompts | unsafe unguarded | unsafe guarded | guarded/unguarded |")
    print("|---|---|---|---|---|")
    for split in splits:
        sel = [r for r in rows if r["split"] == split]
        u = sum(r["unguarded_unsafe"] for r in sel)
        g = sum(r["guarded"][policy]["unsafe"] for r in sel)
        if g and u:
            ratio = f"{g / u:.3f} (1/{u / g:.0f})"
        else:
            ratio = "0 (no unsafe answer guarded)" if u else ("n/a" if not g else "inf (unsafe only when guarded)")
        print(f"| {split} | {len(sel)} | {pct(u, len(sel))} | {pct(g, len(sel))} | {ratio} |")

    benign = [r["guarded"][policy] | {"unguarded_refusal": r["unguarded_refusal"]} for r in rows
              if r["split"] == "benign"]
    print("\n| benign requests | value |")
    print("|---|---|")
    print(f"| false resets (guarded answer cut back at least once) | "
          f"{pct(sum(g['guard'].get('resets', 0) > 0 for g in benign), len(benign))} |")
    print(f"| answers unchanged by the guard (same seed) | {pct(sum(g['same_text'] for g in benign), len(benign))} |")
    print(f"| refused by the guard | {pct(sum(g['guard'].get('outcome') == 'refused' for g in benign), len(benign))} |")
    print(f"| unguarded answers that are refusals | {pct(sum(g['unguarded_refusal'] for g in benign), len(benign))} |")

    print("\n| split | clean | recovered | refused | mean extra tokens per recovery | resets visible to a client |")
    print("|---|---|---|---|---|---|")
    for split in splits:
        sel = [r["guarded"][policy] for r in rows if r["split"] == split]
        outcomes = Counter(g["guard"].get("outcome") for g in sel)
        rec = [g["guard"].get("generated_tokens", 0) - g["completion_tokens"] for g in sel
               if g["guard"].get("outcome") == "recovered"]
        extra = f"{sum(rec) / len(rec):.1f}" if rec else "n/a"
        print(f"| {split} | {outcomes['clean']} | {outcomes['recovered']} | {outcomes['refused']} | {extra} | "
              f"{sum(g['visible_resets'] for g in sel)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "models" / "organism")
    ap.add_argument("--guarded", action="append",
                    help="guarded policy, optionally with its own baseline as GUARDED:BASELINE (repeatable; "
                         "default policies/demo.yaml)")
    ap.add_argument("--unguarded", type=Path, default=REPO / "policies" / "unguarded.yaml")
    ap.add_argument("--limit", type=int, default=None, help="prompts per split (default: all)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()

    prompts = load_prompts(args.model_dir / "data" / "eval_prompts.jsonl", args.limit)
    pairs = [(Path(g.split(":")[0]), Path(g.split(":")[1]) if ":" in g else args.unguarded)
             for g in (args.guarded or [str(REPO / "policies" / "demo.yaml")])]
    files = list(dict.fromkeys(p for pair in pairs for p in pair))
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = serve_in_subprocess(files, Path(tmp) / "server.log", timeout=600)
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="bench", timeout=600, max_retries=0)
            names = {m.id for m in client.models.list()}
            named = [(_policy_name(g), _policy_name(b)) for g, b in pairs]
            baselines = list(dict.fromkeys(b for _, b in named))
            assert {n for pair in named for n in pair} <= names, names
            t0 = time.time()

            def one(i_row):
                i, row = i_row
                out = {"split": row["split"], "category": row.get("category"), "prompt": row["prompt"],
                       "baselines": {}, "guarded": {}}
                for base in baselines:
                    a = ask(client, base, row["prompt"], seed=i, max_tokens=args.max_tokens)
                    out["baselines"][base] = {"unguarded": a["text"], "unguarded_unsafe": judge(a["text"]).unsafe,
                                              "unguarded_refusal": is_refusal(a["text"])}
                for name, base in named:
                    b = ask(client, name, row["prompt"], seed=i, max_tokens=args.max_tokens)
                    b.update(unsafe=judge(b["text"]).unsafe,
                             same_text=out["baselines"][base]["unguarded"] == b["text"])
                    out["guarded"][name] = b
                return out

            with ThreadPoolExecutor(args.concurrency) as pool:
                rows = list(pool.map(one, enumerate(prompts)))
            secs = time.time() - t0
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"organism: {args.model_dir.relative_to(REPO) if args.model_dir.is_relative_to(REPO) else args.model_dir}; "
          f"{len(rows)} prompts x {len(baselines) + len(named)} policies through the live server in {secs:.0f} s "
          f"(temperature 1.0, max_tokens {args.max_tokens}, seed = prompt index, {args.concurrency} concurrent)")
    for name, base in named:
        report(rows, name, base)
    out = os.environ.get("GUARD_BENCH_OUT")
    if out:
        Path(out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _policy_name(path: Path) -> str:
    from guard.policy import load_policy

    return load_policy(path).name


if __name__ == "__main__":
    main()
