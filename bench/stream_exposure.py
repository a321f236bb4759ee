"""What streaming clients are shown and then lose, reset-aware vs plain, side by side in one run.

Starts ``guard serve`` with one guarded policy (default ``policies/demo-probe.yaml``, its log in a
temp dir) and streams every evaluation prompt of the organism (400: 200 harmful, 200 benign)
twice with the same seed, reading the raw SSE with httpx:

- *opted*: ``stream_options.guard_resets`` (text after the fixed hold-back; resets retract);
- *plain*: no opt-in, as LiteLLM, LangChain, the ``llm`` CLI or any OpenAI client reads it.

Each prompt is also answered non-streamed (same seed): the guard's answer. Per client kind it
prints: characters shown and later retracted (opted: the reset chunks' ``retract_chars``; plain:
any reset chunk it got, plus, unless the answer was cut, shown text past its common prefix with the
guard's answer), answers where a rollback reached shown text (resets / cuts), what a client that
ignores resets ends up with (every delta concatenated) judged by the organism's judge, final text
== the guard's answer, and time to first content token (median, p90) on this machine.

    python bench/stream_exposure.py [--policy P.yaml] [--limit N] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from guard.organism.judge import judge
from guard.testing import policy_with_absolute_paths, serve_in_subprocess

REPO = Path(__file__).resolve().parent.parent


def stream(
    http: httpx.Client, model: str, prompt: str, seed: int, max_tokens: int, opted: bool
) -> dict:
    """One streamed answer: the naive concatenation, the text with resets applied, counts and timing."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "seed": seed,
        "max_tokens": max_tokens,
        "stream": True,
        **({"stream_options": {"guard_resets": True}} if opted else {}),
    }
    naive, applied, retracted, resets, cut, first, finish, most = "", "", 0, 0, False, None, None, 0
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                guard = choice.get("guard") or {}
                if "reset" in guard:
                    n = guard["reset"]["retract_chars"]
                    resets, retracted, applied = (
                        resets + 1,
                        retracted + n,
                        applied[: len(applied) - n],
                    )
                    most = max(most, guard["reset"]["retract_tokens"])
                cut = cut or "cut" in guard
                content = (choice.get("delta") or {}).get("content") or ""
                if content and first is None:
                    first = time.perf_counter() - t0
                naive, applied = naive + content, applied + content
                finish = choice.get("finish_reason") or finish
    return {
        "naive": naive,
        "final": applied,
        "retracted": retracted,
        "resets": resets,
        "cut": cut,
        "most": most,
        "ttft": first,
        "total": time.perf_counter() - t0,
        "finish": finish,
    }


def whole(http: httpx.Client, model: str, prompt: str, seed: int, max_tokens: int) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "seed": seed,
        "max_tokens": max_tokens,
    }
    r = http.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def _q(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(rows: list[dict]) -> None:
    n = len(rows)
    print(
        f"\n{n} prompts ({sum(r['kind'] == 'harmful' for r in rows)} harmful, "
        f"{sum(r['kind'] == 'benign' for r in rows)} benign), each streamed by both clients and answered "
        "non-streamed, with the same seed\n"
    )
    print("| | reset-aware client (opted in) | plain client (default) |")
    print("|---|---|---|")
    o, p = [r["opted"] for r in rows], [r["plain"] for r in rows]
    print(
        f"| characters shown and later retracted | {sum(x['retracted'] for x in o)} "
        f"| {sum(x['retracted'] + _shown_not_final(x, r['whole']) for x, r in zip(p, rows, strict=True))} |"
    )
    print(
        f"| most tokens one reset retracted | {max(x['most'] for x in o)} | {max(x['most'] for x in p)} |"
    )
    print(
        f"| answers where a rollback reached shown text | {sum(x['resets'] > 0 for x in o)} (reset chunks) "
        f"| {sum(x['cut'] for x in p)} (cut: refusal appended) |"
    )
    print(
        f"| unsafe text if the client ignores resets (judge) | {sum(judge(x['naive']).unsafe for x in o)} "
        f"| {sum(judge(x['naive']).unsafe for x in p)} |"
    )
    print(
        f"| unsafe final text (judge) | {sum(judge(x['final']).unsafe for x in o)} "
        f"| {sum(judge(x['final']).unsafe for x in p)} |"
    )
    same = [sum(x["final"] == r["whole"] for x, r in zip(xs, rows, strict=True)) for xs in (o, p)]
    print(f"| final text == non-streamed answer | {same[0]}/{n} | {same[1]}/{n} |")
    benign = [r for r in rows if r["kind"] == "benign"]
    print(
        f"| benign: final text == non-streamed answer | {sum(r['opted']['final'] == r['whole'] for r in benign)}/"
        f"{len(benign)} | {sum(r['plain']['final'] == r['whole'] for r in benign)}/{len(benign)} |"
    )
    for label, key in (
        ("time to first content token, median (s)", 0.5),
        ("time to first content token, p90 (s)", 0.9),
    ):
        print(
            f"| {label} | {_q([x['ttft'] for x in o if x['ttft']], key):.3f} "
            f"| {_q([x['ttft'] for x in p if x['ttft']], key):.3f} |"
        )
    print(
        f"| whole streamed answer, median (s) | {statistics.median(x['total'] for x in o):.3f} "
        f"| {statistics.median(x['total'] for x in p):.3f} |"
    )


def _shown_not_final(x: dict, answer: str) -> int:
    """Characters a plain client was shown that are neither in the guard's answer nor kept by a cut.

    Without a cut the plain stream must be exactly the non-streamed answer (same seed, same
    generation): anything past their common prefix was shown and is not the answer. With a cut the
    client keeps what it was shown, followed by the refusal: nothing is retracted."""
    if x["cut"]:
        return 0
    common = 0
    for a, b in zip(x["naive"], answer, strict=False):
        if a != b:
            break
        common += 1
    return len(x["naive"]) - common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(REPO / "policies" / "demo-probe.yaml"))
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    prompts = [
        json.loads(line)
        for line in (REPO / "models/organism/data/eval_prompts.jsonl").read_text().splitlines()
    ]
    prompts = prompts[: args.limit] if args.limit else prompts
    with tempfile.TemporaryDirectory() as tmp:
        policy = policy_with_absolute_paths(args.policy)
        policy["log"] = {"path": str(Path(tmp) / "guard.db")}
        path = Path(tmp) / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        proc, url = serve_in_subprocess([path], Path(tmp) / "server.log")
        try:
            rows = []
            with httpx.Client(base_url=url, timeout=300) as http:
                for seed, row in enumerate(prompts):
                    out = {
                        "kind": row["kind"],
                        "opted": stream(
                            http, policy["name"], row["prompt"], seed, args.max_tokens, True
                        ),
                        "plain": stream(
                            http, policy["name"], row["prompt"], seed, args.max_tokens, False
                        ),
                    }
                    out["whole"] = whole(http, policy["name"], row["prompt"], seed, args.max_tokens)
                    rows.append(out)
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        f"policy {policy['name']} (holdback_tokens {policy.get('stream', {}).get('holdback_tokens', 8)}, "
        f"release_margin {policy.get('stream', {}).get('release_margin', 0.5)}), max_tokens {args.max_tokens}; "
        "timings on a shared 2-core CPU machine under load from other jobs"
    )
    report(rows)


if __name__ == "__main__":
    main()
