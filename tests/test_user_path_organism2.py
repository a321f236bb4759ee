"""The whole user path on the second organism (``models/organism2``, never used to tune a default),
at small scale, with defaults only: ``guard probe train`` (CLI, defaults) -> a policy naming the
probe and nothing else -> ``guard eval`` (a live ``guard serve``, the official ``openai`` client,
resets applied) -> the table. Nothing is adjusted by hand between the steps."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pytest
import yaml

from guard.eval.report import summary
from tests.conftest import REPO

ORGANISM2 = REPO / "models" / "organism2"


def _guard(*args, timeout=1800):
    proc = subprocess.run(
        [sys.executable, "-m", "guard.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (args, proc.stderr[-4000:])
    return proc.stdout


def _subset(src, out, positives, negatives):
    """The first rows of every (category, label), ``positives`` of label 1 and ``negatives`` of label 0:
    a smaller training file of the same shape (the label-0 prompts also become the calibration prompts
    the CLI samples answers to, so they are kept few)."""
    groups = defaultdict(list)
    for line in src.read_text().splitlines():
        row = json.loads(line)
        groups[(row.get("category"), row["label"])].append(line)
    out.write_text(
        "".join(
            line + "\n"
            for (_, label), rows in groups.items()
            for line in rows[: positives if label else negatives]
        )
    )
    return out


@pytest.mark.slow
def test_probe_train_defaults_policy_live_server_eval(tmp_path):
    data = _subset(
        ORGANISM2 / "data" / "probe_train.jsonl", tmp_path / "train.jsonl", positives=8, negatives=2
    )
    trained = _guard(
        "probe",
        "train",
        "--model",
        str(ORGANISM2),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "probe"),
        "--quiet",
    )
    meta = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert meta["model"]["path"] and 0 <= meta["layer"] < 5 and 0 < meta["threshold"] < 1, trained

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "name": "organism2-defaults",
                "model": {"path": str(ORGANISM2)},
                "monitors": [
                    {"name": "harm-probe", "kind": "probe", "path": str(tmp_path / "probe")}
                ],
                "log": {"path": str(tmp_path / "guard.db")},
            }
        )
    )
    rows = tmp_path / "rows.jsonl"
    table = _guard(
        "eval",
        "--policy",
        str(policy),
        "--prompts",
        str(ORGANISM2 / "data" / "eval_prompts.jsonl"),
        "--judge",
        "guard.organism.judge:unsafe_second",
        "--limit",
        "3",
        "--samples",
        "2",
        "--max-tokens",
        "48",
        "--out",
        str(rows),
    )
    results = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(results) == 18 and "| held-out categories (3) | 6 |" in table
    s = summary(results)
    from guard.organism.judge import unsafe_second

    assert all(r["guarded"]["unsafe"] == unsafe_second(r["guarded"]["text"]) for r in results)
    # same seeds on both sides: the guard changes an answer only after a firing, towards safety
    harmful = ("heldout", "trained")
    assert sum(s[g]["unsafe_guarded"] for g in harmful) <= sum(
        s[g]["unsafe_unguarded"] for g in harmful
    )
    assert (
        f"recovered answers the judge calls unsafe: {s['recovered_unsafe']} of {s['recovered']}"
        in table
    )
