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
    assert policy.backtrack.rollback == "sentence" and policy.backtrack.max_retries == 3
    assert policy.stream.holdback_tokens == 8 and policy.stream.reset_marker is None
    assert policy.log.path == tree.resolve() / "guard.db" and policy.log.record == "flagged"
    assert (policy.defaults.max_tokens, policy.defaults.temperature, policy.defaults.top_p) == (256, 1.0, 1.0)


def test_strategy_for_retry_repeats_the_last():
    policy = Policy.model_validate({"name": "p", "model": {"path": "m"},
                                    "backtrack": {"strategies": [{}, {"temperature": 0.5}]}})
    temps = [policy.backtrack.strategy(i).temperature for i in (1, 2, 3, 7)]
    assert temps == [None, 0.5, 0.5, 0.5]


def test_missing_model_directory_is_an_error_unless_paths_are_unchecked(tmp_path: Path):
    path = write(tmp_path, VALID)
    errors = errors_of(path)
    assert any(e.startswith(f"{path}:2:") and "model.path: model directory not found" in e for e in errors)
    assert any("monitors[0].path: probe directory not found" in e for e in errors)
    assert load_policy(path, check_paths=False).model.path == tmp_path.resolve() / "model"


def test_vllm_model_id_is_kept_as_given(tmp_path: Path):
    policy = load_policy(write(tmp_path, "name: p\nmodel: {engine: vllm, path: org/some-model}\n"))
    assert policy.model.path == Path("org/some-model")


def test_every_error_is_reported_at_once_with_position_and_field(tree: Path):
    path = write(tree, """\
name: "bad name"
descripton: typo
model: {engine: tensorflow, path: ./model}
monitors:
  - {name: p, kind: probe, path: ./model/probe, threshold: high, colour: red}
  - {name: q, kind: regex}
backtrack: {rollback: paragraph, max_retries: -1}
""")
    errors = errors_of(path)
    expected = [
        (1, 7, "name", "must match"),
        (2, 1, "descripton", "unknown field 'descripton'; allowed fields: name, description, model, monitors"),
        (3, 17, "model.engine", "allowed values: 'transformers' or 'vllm'"),
        (5, 60, "monitors[0].threshold", "valid number"),
        (5, 66, "monitors[0].colour", "allowed fields: kind, name, path, layer, threshold, aggregation, action"),
        (6, 21, "monitors[1].kind", "invalid value 'regex'; allowed values: 'probe', 'reset_token'"),
        (7, 23, "backtrack.rollback", "allowed values: 'tokens', 'sentence' or 'response'"),
        (7, 47, "backtrack.max_retries", "greater than or equal to 0"),
    ]
    assert len(errors) == len(expected), errors
    for error, (line, col, field, text) in zip(errors, expected):
        assert error.startswith(f"{path}:{line}:{col}: {field}: "), error
        assert text in error, error


def test_nested_aggregation_errors(tree: Path):
    path = write(tree, """\
name: p
model: {path: model}
monitors:
  - name: p
    kind: probe
    path: model/probe
    aggregation: {kind: median, alpha: 0}
""")
    assert errors_of(path) == [
        f"{path}:7:25: monitors[0].aggregation.kind: invalid value 'median'; allowed values: 'none', 'ema' or 'window'",
        f"{path}:7:40: monitors[0].aggregation.alpha: input should be greater than 0",
    ]


def test_unknown_field_in_reset_token_monitor_lists_its_own_fields(tree: Path):
    path = write(tree, "name: p\nmodel: {path: model}\nmonitors:\n  - {kind: reset_token, name: r, path: x}\n")
    (error,) = errors_of(path)
    assert error == f"{path}:4:34: monitors[0].path: unknown field 'path'; allowed fields: kind, name, token, action"


def test_missing_required_fields_point_at_the_parent(tree: Path):
    path = write(tree, "description: no name\nmodel:\n  dtype: float16\nmonitors:\n  - {name: x}\n")
    errors = errors_of(path)
    assert f"{path}:1:1: name: required field is missing" in errors
    assert f"{path}:3:3: model.path: required field is missing" in errors
    assert any(e.startswith(f"{path}:5:5: monitors[0].kind: required field is missing; allowed values:")
               for e in errors)


def test_duplicate_monitor_names_point_at_the_second(tree: Path):
    path = write(tree, """\
name: p
model: {path: model}
monitors:
  - {name: dup, kind: probe, path: model/probe}
  - {name: dup, kind: reset_token}
""")
    assert errors_of(path) == [f"{path}:5:12: monitors[1].name: duplicate monitor name 'dup' (also monitors[0])"]


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


def test_every_field_has_a_description():
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    from guard.policy import schema

    for model in (schema.Policy, schema.ModelSpec, schema.ProbeMonitorSpec, schema.ResetTokenMonitorSpec,
                  schema.AggregationConfig, schema.BacktrackSpec, schema.ResampleStrategy, schema.StreamSpec,
                  schema.LogSpec, schema.RequestDefaults):
        walk(model)
        assert model.model_config.get("extra") == "forbid"


@pytest.mark.parametrize("name", ["demo", "unguarded"])
def test_shipped_policies_validate(name: str):
    policy = load_policy(REPO / "policies" / f"{name}.yaml", check_paths=False)
    assert policy.name == name
    assert policy.model.path == REPO / "models" / "organism"
    assert policy.log.path.parent == REPO / "runs"
    if name == "demo":
        assert [type(m) for m in policy.monitors] == [ProbeMonitorSpec, ResetTokenMonitorSpec]
        assert policy.backtrack.max_retries == 3 and policy.stream.holdback_tokens == 8
    else:
        assert policy.monitors == []
