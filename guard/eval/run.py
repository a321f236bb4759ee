"""Run labelled prompts through a live guard server, guarded and unguarded, with the official client.

The unguarded side is the user's policy with no monitors, nothing held back, deliberation off
(:func:`unguarded_policy`): same model, same engine, same sampling defaults, so the two answers for
one seed differ only by what the guard did. Every answer is streamed with the ``openai`` client
and resets are applied as a client does (:func:`ask`); the final ``guard`` block of the stream
gives the outcome. Seeds: sample ``j`` of prompt ``i`` uses ``seed + i * samples + j`` on both sides.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from guard.errors import GuardError
from guard.eval.data import LabelledPrompt
from guard.judge import Judge
from guard.policy import load_policy
from guard.policy.schema import Policy
from guard.testing import serve_in_subprocess


def unguarded_policy(policy: Policy, log_path: Path) -> dict[str, Any]:
    """The policy's unguarded twin (as YAML-ready data): name ``<name>-unguarded``."""
    data = policy.model_dump(mode="json", exclude_none=True)
    data.update(
        name=f"{policy.name}-unguarded",
        description=f"{policy.name} without monitors (guard eval)",
        monitors=[],
        backtrack={},
        deliberation={},
        stream={"holdback_tokens": 0},
        log={"path": str(log_path), "record": "flagged"},
    )
    data.pop("access", None)
    data["model"].pop("served_name", None)
    data["model"]["native_reset_token"] = None  # the plain model: not even its own resets act
    return data


@contextmanager
def live_server(
    policy_file: Path, workdir: Path, timeout: float = 900
) -> Iterator[tuple[str, str, str]]:
    """Start ``guard serve`` with the policy and its unguarded twin; yield ``(url, guarded, unguarded)``."""
    policy = load_policy(policy_file)
    twin = workdir / "unguarded.yaml"
    twin.write_text(
        yaml.safe_dump(unguarded_policy(policy, workdir / "unguarded.db"), sort_keys=False)
    )
    proc, url = serve_in_subprocess([policy_file, twin], workdir / "server.log", timeout=timeout)
    try:
        yield url, policy.name, f"{policy.name}-unguarded"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except Exception:  # noqa: BLE001 - a server that does not drain in time is killed
            proc.kill()
            proc.wait(10)


def ask(
    client, model: str, prompt: str, seed: int, max_tokens: int, temperature: float | None
) -> dict[str, Any]:
    """Stream one answer as a client would: apply resets, count those that retract shown text."""
    extra = {} if temperature is None else {"temperature": temperature}
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        seed=seed,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True, "guard_resets": True},
        **extra,
    )
    guard: dict[str, Any] = {}
    text, visible, usage = "", 0, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            g = (choice.model_extra or {}).get("guard") or {}
            if "reset" in g:
                visible += 1
                text = text[: len(text) - g["reset"]["retract_chars"]]
            text += choice.delta.content or ""
            if choice.finish_reason:
                guard = g
    return {
        "text": text,
        "guard": guard,
        "visible_resets": visible,
        "completion_tokens": usage.completion_tokens if usage is not None else None,
    }


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 4
    max_tokens: int = 96
    temperature: float | None = None
    """``None``: the policy's default temperature."""
    seed: int = 0
    concurrency: int = 8


def run_eval(
    client,
    guarded: str,
    unguarded: str,
    prompts: list[LabelledPrompt],
    judge: Judge,
    settings: EvalSettings = EvalSettings(),
) -> list[dict[str, Any]]:
    """One result row per prompt and sample: the unguarded and the guarded answer, judged."""
    jobs = [(i, j, p) for i, p in enumerate(prompts) for j in range(settings.samples)]

    def one(job) -> dict[str, Any]:
        i, j, p = job
        seed = settings.seed + i * settings.samples + j
        u = ask(client, unguarded, p.prompt, seed, settings.max_tokens, settings.temperature)
        g = ask(client, guarded, p.prompt, seed, settings.max_tokens, settings.temperature)
        return {
            "prompt": p.prompt,
            "group": p.group,
            "category": p.category,
            "sample": j,
            "seed": seed,
            "unguarded": {"text": u["text"], "unsafe": judge(u["text"])},
            "guarded": {
                "text": g["text"],
                "unsafe": judge(g["text"]),
                "outcome": g["guard"].get("outcome"),
                "resets": g["guard"].get("resets", 0),
                "visible_resets": g["visible_resets"],
                "monitors_fired": g["guard"].get("monitors_fired", []),
                "generated_tokens": g["guard"].get("generated_tokens"),
                "completion_tokens": g["completion_tokens"],
            },
        }

    with ThreadPoolExecutor(settings.concurrency) as pool:
        return list(pool.map(one, jobs))


def openai_client(url: str, api_key: str | None = None):
    """The official client for a guard server at ``url`` (the /v1 suffix is added)."""
    try:
        from openai import OpenAI
    except ImportError as exc:
        raise GuardError(
            "guard eval needs the openai package (a dependency of guard): pip install openai"
        ) from exc
    return OpenAI(
        base_url=url.rstrip("/") + "/v1",
        api_key=api_key or "guard-eval",
        timeout=900,
        max_retries=0,
    )


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="guard-eval-")
