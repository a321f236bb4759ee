"""Policy loading: resolved paths, the content hash, and errors that name file, line, column and field."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import yaml

from guard.errors import PolicyError
from guard.policy import Policy, ProbeMonitorSpec, ResetTokenMonitorSpec, format_policy, load_policy

REPO = Path(__file__).resolve().parents[1]

VALID = """\
name: demo
model: {engine: transformers, path: ./model}
monitors:
  - {name: harm-probe, kind: probe, path: ./model/probe}   # layer/threshold from the probe file
backtrack: {rollback: sentence, max_retries: 3, on_exhausted: refuse}
stream: {holdback_tokens: 8}
log: {path: ./guard.db}
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "model" / "probe").mkdir(parents=True)
    return tmp_path


def write(dir: Path, text: str, name: str = "policy.yaml") -> Path:
    path = dir / name
    path.write_text(text)
    return path


def errors_of(path: Path, **kw) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path, **kw)
    assert info.value.path == str(path)
    return info.value.errors


def test_valid_policy_resolves_paths_and_hashes_the_file(tree: Path):
    path = write(tree, VALID)
    policy = load_policy(path)
    assert policy.name == "demo"
    assert policy.model.path == tree.resolve() / "model"
    assert policy.model.served_name == "demo"
    assert policy.log.path == tree.resolve() / "guard.db"
    probe = policy.monitors[0]
    assert isinstance(probe, ProbeMonitorSpec)
    assert probe.path == tree.resolve() / "model" / "probe"
    assert probe.layer is None and probe.threshold is None and probe.aggregation is None
    assert policy.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.source_path == path.resolve()
    assert len(policy.backtrack.strategies) == 1


def test_defaults_are_filled_in(tree: Path):
    policy = load_policy(write(tree, "name: p\nmodel: {path: model}\n"))
    assert policy.monitors == []
    assert policy.backtrack.rollback == "response" and policy.backtrack.max_retries == 3
    assert policy.stream.holdback_tokens == 8 and policy.stream.reset_marker is None
    assert policy.log.path == tree.resolve() / "guard.db" and policy.log.record == "flagged"
    assert (policy.defaults.max_tokens, policy.defaults.temperature, policy.defaults.top_p) == (
        256,
        1.0,
        1.0,
    )


def test_strategy_for_retry_repeats_the_last():
    policy = Policy.model_validate(
        {
            "name": "p",
            "model": {"path": "m"},
            "backtrack": {"strategies": [{}, {"temperature": 0.5}]},
        }
    )
    temps = [policy.backtrack.strategy(i).temperature for i in (1, 2, 3, 7)]
    assert temps == [None, 0.5, 0.5, 0.5]


def test_missing_model_directory_is_an_error_unless_paths_are_unchecked(tmp_path: Path):
    path = write(tmp_path, VALID)
    errors = errors_of(path)
    assert any(
        e.startswith(f"{path}:2:") and "model.path: model directory not found" in e for e in errors
    )
    assert any("monitors[0].path: probe directory not found" in e for e in errors)
    assert load_policy(path, check_paths=False).model.path == tmp_path.resolve() / "model"


def test_vllm_model_id_is_kept_as_given(tmp_path: Path):
    policy = load_policy(write(tmp_path, "name: p\nmodel: {engine: vllm, path: org/some-model}\n"))
    assert policy.model.path == Path("org/some-model")


def test_every_error_is_reported_at_once_with_position_and_field(tree: Path):
    path = write(
        tree,
        """\
name: "bad name"
descripton: typo
model: {engine: tensorflow, path: ./model}
monitors:
  - {name: p, kind: probe, path: ./model/probe, threshold: high, colour: red}
  - {name: q, kind: regex}
backtrack: {rollback: paragraph, max_retries: -1}
""",
    )
    errors = errors_of(path)
    expected = [
        (1, 7, "name", "must match"),
        (
            2,
            1,
            "descripton",
            "unknown field 'descripton'; allowed fields: name, description, model, monitors",
        ),
        (3, 17, "model.engine", "allowed values: 'transformers' or 'vllm'"),
        (5, 60, "monitors[0].threshold", "valid number"),
        (
            5,
            66,
            "monitors[0].colour",
            "allowed fields: kind, name, path, layer, threshold, aggregation, action",
        ),
        (
            6,
            21,
            "monitors[1].kind",
            "invalid value 'regex'; allowed values: 'probe', 'reset_token'",
        ),
        (7, 23, "backtrack.rollback", "allowed values: 'auto', 'tokens', 'sentence' or 'response'"),
        (7, 47, "backtrack.max_retries", "greater than or equal to 0"),
    ]
    assert len(errors) == len(expected), errors
    for error, (line, col, field, text) in zip(errors, expected, strict=True):
        assert error.startswith(f"{path}:{line}:{col}: {field}: "), error
        assert text in error, error


def test_nested_aggregation_errors(tree: Path):
    path = write(
        tree,
        """\
name: p
model: {path: model}
monitors:
  - name: p
    kind: probe
    path: model/probe
    aggregation: {kind: median, alpha: 0}
""",
    )
    assert errors_of(path) == [
        f"{path}:7:25: monitors[0].aggregation.kind: invalid value 'median'; allowed values: 'none', 'ema' or 'window'",
        f"{path}:7:40: monitors[0].aggregation.alpha: input should be greater than 0",
    ]


def test_unknown_field_in_reset_token_monitor_lists_its_own_fields(tree: Path):
    path = write(
        tree,
        "name: p\nmodel: {path: model}\nmonitors:\n  - {kind: reset_token, name: r, path: x}\n",
    )
    (error,) = errors_of(path)
    assert error == (
        f"{path}:4:34: monitors[0].path: unknown field 'path'; "
        "allowed fields: kind, name, token, action, scope"
    )


def test_missing_required_fields_point_at_the_parent(tree: Path):
    path = write(tree, "description: no name\nmodel:\n  dtype: float16\nmonitors:\n  - {name: x}\n")
    errors = errors_of(path)
    assert f"{path}:1:1: name: required field is missing" in errors
    assert f"{path}:3:3: model.path: required field is missing" in errors
    assert any(
        e.startswith(f"{path}:5:5: monitors[0].kind: required field is missing; allowed values:")
        for e in errors
    )


def test_duplicate_monitor_names_point_at_the_second(tree: Path):
    path = write(
        tree,
        """\
name: p
model: {path: model}
monitors:
  - {name: dup, kind: probe, path: model/probe}
  - {name: dup, kind: reset_token}
""",
    )
    assert errors_of(path) == [
        f"{path}:5:12: monitors[1].name: duplicate monitor name 'dup' (also monitors[0])"
    ]


def test_duplicate_yaml_keys_are_rejected(tree: Path):
    path = write(tree, "name: a\nmodel: {path: model}\nname: b\n")
    assert errors_of(path) == [f"{path}:3:1: name: duplicate key 'name'"]


def test_yaml_syntax_error_has_line_and_column(tree: Path):
    path = write(tree, "name: p\nmodel: {path: model\nmonitors: []\n")
    (error,) = errors_of(path)
    assert re.match(rf"{re.escape(str(path))}:3:\d+: YAML syntax: ", error), error


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_non_mapping_documents_are_rejected(tree: Path, text: str):
    (error,) = errors_of(write(tree, text))
    assert "<root>: the policy must be a mapping" in error


def test_unreadable_file_is_a_policy_error(tmp_path: Path):
    (error,) = errors_of(tmp_path / "missing.yaml")
    assert "cannot read policy file" in error


def test_format_policy_round_trips(tree: Path):
    policy = load_policy(write(tree, VALID))
    text = format_policy(policy)
    assert text.startswith(f"# source: {policy.source_path}\n# sha256: {policy.content_hash}\n")
    again = Policy.model_validate(yaml.safe_load(text))
    assert again.model_dump() == policy.model_dump()


def test_format_policy_hides_a_log_url_password(tree: Path):
    data = yaml.safe_load(VALID)
    data["log"] = {"url": "postgresql://guard:s3cret@db.internal:5432/guard"}
    policy = Policy.model_validate(data)
    text = format_policy(policy)
    assert "s3cret" not in text and "postgresql://guard:***@db.internal:5432/guard" in text


def test_every_field_has_a_description():
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"

    from guard.policy import schema
    from guard.policy.docs import _models_in_order

    models = [m for m, _ in _models_in_order()]
    assert {
        schema.Policy,
        schema.ProbeMonitorSpec,
        schema.ResetTokenMonitorSpec,
        schema.AccessSpec,
    } <= set(models)
    for model in models:
        walk(model)
        assert model.model_config.get("extra") == "forbid"


@pytest.mark.parametrize("name", ["demo", "unguarded", "deliberate"])
def test_shipped_demo_policies(name: str):
    policy = load_policy(REPO / "policies" / f"{name}.yaml", check_paths=False)
    assert policy.name == name
    assert policy.model.path == REPO / "models" / "organism"
    assert policy.log.path.parent == REPO / "runs"
    if name == "demo":
        assert [type(m) for m in policy.monitors] == [
            ProbeMonitorSpec,
            ResetTokenMonitorSpec,
            ProbeMonitorSpec,
        ]
        assert policy.backtrack.max_retries == 3 and policy.stream.holdback_tokens == 8
        risk = policy.monitor("risk-probe")
        assert (risk.scope, risk.action) == ("prompt", "shadow")  # action: log, the alias
        d = policy.deliberation
        assert (d.mode, d.risk_monitor, d.spec_file) == (
            "on_risk",
            "risk-probe",
            REPO / "policies" / "spec" / "organism.md",
        )
    elif name == "deliberate":
        assert policy.deliberation.mode == "always" and policy.deliberation.spec_file is not None
    else:
        assert policy.monitors == []


# -- scope, actions, on_monitor_error, access ---------------------------------------------------


def test_new_fields_default_to_todays_behaviour(tree: Path):
    policy = load_policy(write(tree, VALID))
    assert policy.monitors[0].scope == "output" and policy.monitors[0].action == "backtrack"
    assert policy.on_monitor_error == "fail_closed" and policy.access is None


def test_scope_action_error_handling_and_access_errors(tree: Path):
    path = write(
        tree,
        """\
name: p
model: {path: model}
on_monitor_error: fail_sideways
access: {}
monitors:
  - {name: a, kind: probe, path: model/probe, scope: input, action: refuse}
  - {name: b, kind: reset_token, scope: both, action: block}
""",
    )
    assert errors_of(path) == [
        f"{path}:3:19: on_monitor_error: invalid value 'fail_sideways'; allowed values: 'fail_closed' or 'fail_open'",
        f"{path}:4:9: access: access binds no key: set api_keys or api_key_env, or remove the access section",
        f"{path}:6:54: monitors[0].scope: invalid value 'input'; allowed values: 'prompt', 'output' or 'both'",
        f"{path}:7:55: monitors[1].action: invalid value 'block'; allowed values: 'backtrack', 'refuse' or 'shadow'",
    ]


def test_access_key_errors_name_the_entry(tree: Path):
    path = write(
        tree, "name: p\nmodel: {path: model}\naccess: {api_key_env: [1BAD], api_keys: ['']}\n"
    )
    assert errors_of(path) == [
        f"{path}:3:24: access.api_key_env[0]: '1BAD' must match ^[A-Za-z_][A-Za-z0-9_]*$",
        f"{path}:3:42: access.api_keys[0]: string should have at least 1 character",
    ]


def test_access_keys_come_from_the_file_and_the_environment(tree: Path):
    policy = load_policy(
        write(tree, "name: p\nmodel: {path: model}\naccess: {api_keys: [a], api_key_env: [K, L]}\n")
    )
    assert policy.access.resolve_keys({"K": "b, c", "L": "d"}) == {"a", "b", "c", "d"}
    with pytest.raises(
        PolicyError, match=r"access.api_key_env\[1\]: environment variable L is unset or empty"
    ):
        policy.access.resolve_keys({"K": "b", "L": " , "})


SHIPPED = sorted(p.name for p in (REPO / "policies").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_policy_passes_guard_policy_check(name: str, capsys):
    from guard.cli import main

    remote = name == "llama3-8b.yaml"  # paths of a GPU host: validated without checking they exist
    args = [
        "policy",
        "check",
        *(["--no-path-check"] if remote else []),
        str(REPO / "policies" / name),
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert f"{name}: ok (sha256" in capsys.readouterr().out


def test_shipped_examples_use_the_new_semantics():
    strict = load_policy(REPO / "policies" / "strict.yaml")
    assert strict.monitors[0].scope == "both" and strict.backtrack.rollback == "tokens"
    assert strict.backtrack.max_retries <= 2 and strict.log.record == "all"
    shadow = load_policy(REPO / "policies" / "shadow.yaml")
    assert shadow.monitors and all(m.action == "shadow" for m in shadow.monitors)
    llama = load_policy(REPO / "policies" / "llama3-8b.yaml", check_paths=False)
    assert {m.kind for m in llama.monitors} == {"probe", "sae"} and llama.monitors[0].layer == 16


def test_policy_check_reports_every_file_and_exits_2(tree: Path, capsys):
    import torch

    from guard.cli import main
    from guard.monitors.probe import ProbeMonitor
    from guard.testing import make_random_llama

    # policy check reads the model's config and tokenizer: the good policy's model and probe are real.
    make_random_llama(tree / "model")
    ProbeMonitor("harm-probe", 1, torch.ones(64), 0.0).save(tree / "model" / "probe")
    good = write(tree, VALID, "good.yaml")
    bad1 = write(tree, "name: p\nmodel: {path: missing}\nmonitors: 3\n", "bad1.yaml")
    bad2 = write(tree, "name: q\nmodel: {path: model}\nstream: {holdback: 1}\n", "bad2.yaml")
    assert main(["policy", "check", str(bad1), str(good), str(bad2)]) == 2
    out, err = capsys.readouterr()
    assert f"# {good}: ok" in out and "name: demo" in out
    assert f"{bad1}:2:15: model.path: model directory not found" in err
    assert f"{bad1}:3:11: monitors: input should be a valid list" in err
    assert f"{bad2}:3:10: stream.holdback: unknown field 'holdback'" in err
    assert main(["policy", "check", "--no-path-check", str(bad1)]) == 2
    err = capsys.readouterr().err
    assert "model.path" not in err and "monitors: input should be a valid list" in err
