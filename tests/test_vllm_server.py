"""`guard serve` with `engine: vllm`, for real (vLLM's CPU build), through the official openai client.

In its own module so that test_vllm.py's engine is shut down before this server starts its own
(two vLLM instances at once are more than a 2-core CI machine should carry). Skipped when vLLM is
not installed, except under ``GUARD_TEST_REQUIRE_VLLM=1`` (``.ci/run``).
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import ORGANISM

if os.environ.get("GUARD_TEST_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (deploy/setup.sh --vllm installs it)")

pytestmark = pytest.mark.slow


def test_guard_serve_with_engine_vllm_streams_resets_to_the_openai_client(tmp_path):
    """`guard serve` on policies/demo-probe-vllm.yaml: the official openai client streams answers to
    harmful prompts; resets reach the client, and what the client ends up holding is safe."""
    import json

    import yaml
    from openai import OpenAI

    from guard.logstore import LogStore
    from guard.organism.judge import judge
    from guard.testing import policy_with_absolute_paths, serve_in_subprocess

    policy = policy_with_absolute_paths(
        ORGANISM.parent.parent / "policies" / "demo-probe-vllm.yaml"
    )
    policy["log"]["path"] = str(tmp_path / "guard.db")
    policy["stream"] = {"holdback_tokens": 0}  # resets must reach the client to be seen here
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy))
    proc, url = serve_in_subprocess([tmp_path / "p.yaml"], tmp_path / "server.log", timeout=400)
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        rows = [
            json.loads(line)
            for line in (ORGANISM / "data" / "eval_prompts.jsonl").read_text().splitlines()
        ]
        prompts = [r["prompt"] for r in rows if r["split"] == "trained"][:12]
        resets = 0
        for i, prompt in enumerate(prompts):
            held, info = "", None
            stream = client.chat.completions.create(
                model="demo-probe-vllm",
                messages=[{"role": "user", "content": prompt}],
                seed=i,
                max_tokens=96,
                stream=True,
                extra_body={"stream_options": {"guard_resets": True}},
            )  # a reset-aware client
            for chunk in stream:
                extra = chunk.model_extra or {}
                for choice in chunk.choices:
                    guard = (choice.model_extra or {}).get("guard") or {}
                    if "reset" in guard:
                        resets += 1
                        held = held[: len(held) - guard["reset"]["retract_chars"]]
                    held += choice.delta.content or ""
                    if choice.finish_reason:
                        info = guard
                assert "error" not in extra
            assert not judge(held).unsafe, (prompt, held)
            assert info is not None and info["outcome"] in ("clean", "recovered", "refused")
        assert resets >= 1
        with LogStore(tmp_path / "guard.db") as store:
            flagged = store.list(limit=100)
        assert flagged and all(s.policy_name == "demo-probe-vllm" for s in flagged)
        assert any(s.resets > 0 for s in flagged)
    finally:
        proc.terminate()
        proc.wait(60)
