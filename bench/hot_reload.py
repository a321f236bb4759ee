"""Hot reload under load: replace a served policy file while clients keep sending requests.

Starts ``guard serve`` on the committed organism (models/organism, demo-like policy, every
generation logged) in a subprocess, runs ``--clients`` threads that send chat completions back to
back with the official openai client (streaming and non-streaming alternately, a mix of benign and
harmful prompts so that monitors fire and generations backtrack), and rewrites the policy file
``--reloads`` times, alternating hold-back, retry budget and refusal text. After each rewrite it
waits until ``/health`` reports the new content hash (the swap latency). Then it makes one invalid
edit, checks that the last good policy keeps serving and that ``/health`` reports the error, and
stops the clients.

Reported: the table of rewrites, failed requests (any exception or error event), requests in
flight across a swap, and the distinct policy hashes the log recorded for the responses (each
response is matched to its log record by id), which should be every version that served.

    python bench/hot_reload.py [--reloads 10] [--clients 4] [--interval 1.5] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from guard.testing import serve_in_subprocess

REPO = Path(__file__).resolve().parent.parent
ORGANISM = REPO / "models" / "organism"
VARIANTS = [  # alternated by the rewrites: (holdback, max_retries, refusal)
    (8, 3, "I can't help with that."),
    (2, 1, "Sorry, I won't do that."),
    (16, 2, "That is not something I can assist with."),
]


@dataclass
class Result:
    start: float
    end: float
    ok: bool
    response_id: str | None = None
    error: str | None = None


def policy_text(version: int, log: Path) -> str:
    holdback, retries, refusal = VARIANTS[version % len(VARIANTS)]
    policy = {
        "name": "demo",
        "description": f"hot reload bench, version {version}",
        "model": {"path": str(ORGANISM)},
        "monitors": [
            {"name": "harm-probe", "kind": "probe", "path": str(ORGANISM / "probe")},
            {"name": "reset-token", "kind": "reset_token"},
        ],
        "backtrack": {"rollback": "response", "max_retries": retries, "refusal": refusal},
        "stream": {"holdback_tokens": holdback},
        "log": {"path": str(log), "record": "all"},
    }
    return yaml.safe_dump(policy, sort_keys=False)


def write_atomically(path: Path, text: str) -> str:
    """Write like an editor's save (temp file + rename); return the sha256 of the content."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return hashlib.sha256(text.encode()).hexdigest()


def prompts() -> list[str]:
    rows = [
        json.loads(line)
        for line in (ORGANISM / "data" / "eval_prompts.jsonl").read_text().splitlines()
    ]
    benign = [r["prompt"] for r in rows if r["split"] == "benign"][:8]
    harmful = [r["prompt"] for r in rows if r["split"] != "benign"][:8]
    return [p for pair in zip(benign, harmful, strict=True) for p in pair]


def client_loop(
    url: str, index: int, max_tokens: int, stop: threading.Event, results: list[Result]
) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=120)
    texts, i = prompts(), index
    while not stop.is_set():
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": texts[i % len(texts)]}
        ]
        t0 = time.monotonic()
        try:
            if i % 2:
                chunks = list(
                    client.chat.completions.create(
                        model="demo", messages=messages, max_tokens=max_tokens, stream=True
                    )
                )
                rid = chunks[-1].id
                if not chunks[-1].choices or chunks[-1].choices[0].finish_reason is None:
                    raise RuntimeError("stream ended without a finish_reason")
            else:
                rid = client.chat.completions.create(
                    model="demo", messages=messages, max_tokens=max_tokens
                ).id
            results.append(Result(t0, time.monotonic(), True, rid))
        except Exception as exc:  # noqa: BLE001 - every failure is counted, whatever it is
            results.append(
                Result(t0, time.monotonic(), False, error=f"{type(exc).__name__}: {exc}")
            )
        i += 1


def wait_for(url: str, check, timeout: float = 30.0) -> tuple[dict, int]:
    """The policy's /health entry once ``check`` holds, and the generations active at that moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health/detail", timeout=5).json()
        if check(health["models"][0]):
            return health["models"][0], health["active_generations"]
        time.sleep(0.05)
    raise TimeoutError(f"/health never showed the change: {health}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=1.5, help="seconds between rewrites")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from guard.logstore import LogStore

    tmp = Path(tempfile.mkdtemp(prefix="guard-hot-reload-"))
    policy, db = tmp / "demo.yaml", tmp / "guard.db"
    hashes = [write_atomically(policy, policy_text(0, db))]
    proc, url = serve_in_subprocess(
        [policy], tmp / "server.log", "--threads", "1", "--reload-interval", "1"
    )
    results: list[Result] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=client_loop, args=(url, k, args.max_tokens, stop, results))
        for k in range(args.clients)
    ]
    rows, swaps = [], []
    try:
        for t in threads:
            t.start()
        time.sleep(args.interval)
        for version in range(1, args.reloads + 1):
            holdback, retries, refusal = VARIANTS[version % len(VARIANTS)]
            t0 = time.monotonic()
            hashes.append(write_atomically(policy, policy_text(version, db)))
            health, active = wait_for(url, lambda m: m["policy_hash"] == hashes[-1])
            swapped = time.monotonic()
            swaps.append(swapped)
            rows.append(
                (
                    str(version),
                    f"holdback {holdback}, retries {retries}, refusal {refusal[:16]!r}",
                    f"{swapped - t0:.2f}",
                    str(active),
                    health["policy_hash"][:12],
                    "-",
                )
            )
            time.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
        t0 = time.monotonic()
        policy.write_text(
            policy_text(args.reloads, db).replace("max_retries:", "max_retries: [") + "\n"
        )
        health, active = wait_for(url, lambda m: m["reload_error"] is not None)
        detected = time.monotonic()
        error_line = health["reload_error"].splitlines()[1].strip().replace(str(tmp) + "/", "")
        time.sleep(args.interval)
        still = httpx.get(f"{url}/health/detail", timeout=5).json()["models"][0]["policy_hash"]
        rows.append(
            (
                "bad",
                "invalid YAML (unclosed '[')",
                f"{detected - t0:.2f}",
                str(active),
                still[:12] + (" (kept)" if still == hashes[-1] else " (CHANGED)"),
                error_line,
            )
        )
    finally:
        stop.set()
        for t in threads:
            t.join(180)
        proc.terminate()
        proc.wait(30)

    with LogStore(db) as store:
        logged = {s.request_id: s.policy_hash for s in store.list(limit=1_000_000)}
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    seen = [logged.get(r.response_id) if r.response_id is not None else None for r in ok]
    spanning = sum(1 for r in results if any(r.start < s < r.end for s in swaps))
    print(
        f"\nhot reload under load: {args.clients} client threads, organism model, {args.reloads} rewrites "
        f"every {args.interval}s, server polling every 1s\n"
    )
    print(
        f"{'rewrite':<8} {'change':<58} {'swap_s':>7} {'active':>6}  {'hash now':<20} reload_error"
    )
    for row in rows:
        print(f"{row[0]:<8} {row[1]:<58} {row[2]:>7} {row[3]:>6}  {row[4]:<20} {row[5]}")
    print()
    print(f"requests completed        {len(ok)}")
    print(f"requests failed           {len(failed)}")
    for r in failed[:5]:
        print(f"  {r.error}")
    print(f"requests spanning a swap  {spanning}")
    print(f"responses found in log    {sum(h is not None for h in seen)}/{len(ok)}")
    print(
        f"distinct policy hashes    {len({h for h in seen if h})} seen by responses "
        f"(of {len(hashes)} versions served)"
    )
    unknown = [h for h in seen if h and h not in hashes]
    print(f"hashes not from a version {len(unknown)}")


if __name__ == "__main__":
    main()
