"""``guard policy check`` against the model: what ``guard serve`` would refuse, found from the
config and tokenizer in the same pass as field errors; cross-field errors beside field errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from guard.cli import main
from guard.errors import GuardError
from guard.monitors.probe import ProbeMonitor
from guard.policy import load_policy
from guard.policy.model_check import model_errors

REPO = Path(__file__).resolve().parent.parent
ORGANISM = REPO / "models" / "organism"


@pytest.fixture
def tree(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny model (2 layers, d_model 64, has <|reset|> but no <|undo|>) and probes for it and for another model."""
    ProbeMonitor("fits", 1, torch.ones(64), 0.0).save(tmp_path / "fits")
    ProbeMonitor("deep", 5, torch.ones(64), 0.0).save(tmp_path / "deep")
    ProbeMonitor("wide", 1, torch.ones(128), 0.0).save(tmp_path / "wide")
    (tmp_path / "model").symlink_to(tiny_model_dir)
    return tmp_path


def _write(tree: Path, name: str = "p", **policy) -> Path:
    data = {"name": name, "model": {"path": "./model"}, "log": {"path": "./guard.db"}, **policy}
    path = tree / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_fitting_policy_has_no_model_errors(tree):
    path = _write(tree, monitors=[{"name": "fits", "kind": "probe", "path": "./fits"}])
    assert model_errors(load_policy(path)) == []


def test_everything_serve_would_refuse_is_reported_at_once(tree, capsys):
    spec = "rule " * 400  # far more than the 512-token context
    path = _write(
        tree,
        monitors=[
            {"name": "deep", "kind": "probe", "path": "./deep"},
            {"name": "wide", "kind": "probe", "path": "./wide"},
            {"name": "fits", "kind": "probe", "path": "./fits"},
            {"name": "reset", "kind": "reset_token", "token": "<|undo|>"},
        ],
        deliberation={"mode": "always", "spec": spec},
    )
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "monitors[0] (deep): probe 'deep' reads layer 5 but model" in err and "2 layers" in err
    assert "monitors[1] (wide): probe 'wide' has d_model 128" in err and "d_model 64" in err
    assert "monitors[2]" not in err
    assert (
        "monitors[3] (reset): monitor 'reset': the model's vocabulary has no token '<|undo|>'"
        in err
    )
    assert (
        "deliberation: the forced reasoning prefix" in err and "context window is 512 tokens" in err
    )
    # guard serve refuses the same policy, with the first of those messages.
    from guard.service import GuardService

    with pytest.raises(GuardError, match="probe 'deep' reads layer 5"):
        GuardService.from_policy_files([path]).close()


def test_the_organism_policies_pass_and_print_their_exposure(capsys):
    if not (ORGANISM / "probe" / "probe.json").is_file():
        pytest.skip("models/organism is not built")
    assert main(["policy", "check", str(REPO / "policies" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "reset-aware clients" in out and "other clients: 0" in out


def test_cross_field_errors_come_with_field_errors(tree):
    path = _write(
        tree,
        monitors=[{"name": "fits", "kind": "probe", "path": "./fits", "threshold": "high"}],
        deliberation={"mode": "on_risk", "spec": "Rule 1.", "risk_monitor": "nope"},
        backtrack={"strategies": [{"deliberate": True}]},
    )
    from guard.errors import PolicyError

    with pytest.raises(PolicyError) as info:
        load_policy(path)
    errors = "\n".join(info.value.errors)
    assert "monitors[0].threshold" in errors
    assert "deliberation.risk_monitor: deliberation.risk_monitor names no monitor: 'nope'" in errors
    # the same policy without the field error: the cross-field error alone, from the model validator
    path = _write(
        tree,
        monitors=[{"name": "fits", "kind": "probe", "path": "./fits"}],
        deliberation={"mode": "on_risk", "spec": "Rule 1.", "risk_monitor": "nope"},
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert len(info.value.errors) == 1 and "names no monitor: 'nope'" in info.value.errors[0]


@pytest.mark.parametrize(
    "backtrack, bounded",
    [
        (
            {"rollback": "tokens", "rollback_tokens": 12, "garble_margin": None, "max_retries": 1},
            True,
        ),
        (
            {"rollback": "tokens", "rollback_tokens": 12, "garble_margin": None},
            False,
        ),  # a second rollback after a kept prefix cuts back to the response start
        (
            {"rollback": "tokens", "rollback_tokens": 12},
            False,
        ),  # a garble firing cuts back to the response start
        ({"rollback": "auto", "garble_margin": None}, False),  # no safe prefix: the response start
    ],
)
def test_the_exposure_bound_covers_every_rollback_a_policy_can_make(tree, backtrack, bounded):
    from guard.policy.model_check import exposure_lines

    path = _write(
        tree,
        monitors=[{"name": "fits", "kind": "probe", "path": "./fits"}],
        backtrack=backtrack,
        stream={"holdback_tokens": 4},
    )
    (line,) = [x for x in exposure_lines(load_policy(path)) if "reset-aware clients" in x]
    assert ("at most 8 tokens" in line) == bounded and ("everything shown" in line) != bounded
