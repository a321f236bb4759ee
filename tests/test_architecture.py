"""The import graph keeps its layers (pyproject's ``[tool.importlinter]`` contract), and the
policy/controller vocabulary is written once.

The layers check runs grimp on the source (function-level imports included), so it fails when
someone adds an upward import anywhere; the second test proves it can fail by adding one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "layers"]
    return contract


def _layers() -> list[grimp.Layer]:
    """The contract's layers in grimp's terms (``a | b``: independent siblings; ``a : b``: not)."""
    layers = []
    for line in _contract()["layers"]:
        independent = "|" in line
        names = [n.strip() for n in line.replace("|", ":").split(":")]
        layers.append(grimp.Layer(*names, independent=independent))
    return layers


@pytest.fixture
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("guard", "server", include_external_packages=False, cache_dir=None)


def _violations(graph: grimp.ImportGraph) -> list[str]:
    found = graph.find_illegal_dependencies_for_layers(layers=_layers())
    lines = []
    for dep in sorted(found, key=lambda d: (d.importer, d.imported)):
        for route in dep.routes:
            chain = " -> ".join([*route.heads, *route.middle, *route.tails])
            lines.append(f"{dep.importer} imports {dep.imported}: {chain}")
    return lines


def test_every_layer_imports_only_from_layers_below(graph):
    assert _violations(graph) == []


def test_an_added_upward_import_is_caught(graph):
    graph.add_import(importer="guard.engine.base", imported="guard.controller.backtrack")
    graph.add_import(importer="guard.logstore.store", imported="guard.telemetry.generation")
    found = _violations(graph)
    assert any(v.startswith("guard.engine imports guard.controller") for v in found), found
    assert any(v.startswith("guard.logstore imports guard.telemetry") for v in found), found


def test_every_listed_layer_exists(graph):
    for layer in _layers():
        for name in layer.module_tails:
            assert name in graph.modules, f"{name} is in the layers contract but not in the code"


LAZY_FIRST_PARTY = {
    # CLI dispatch: a subcommand's module (and torch) is loaded only when that subcommand runs.
    "guard/cli.py",
    "guard/eval/cli.py",
    "guard/logs_cli.py",
    "guard/probe_cli.py",
    "guard/sae_cli.py",
    # `guard policy check` builds monitors only when it has a model to check them against (torch).
    "guard/policy/model_check.py",
    # the optional vllm package (guard[vllm]).
    "guard/policy/build.py",
    "guard/engine/vllm_engine.py",
    # the app module is imported by `guard serve --help`; the service (torch, engines) at start.
    "server/app.py",
}


def test_first_party_imports_are_at_module_level_except_listed_lazy_ones():
    late = []
    for path in sorted([*ROOT.glob("guard/**/*.py"), *ROOT.glob("server/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.ImportFrom)
                    and (sub.module or "").split(".")[0]
                    in (
                        "guard",
                        "server",
                    )
                    and rel not in LAZY_FIRST_PARTY
                ):
                    late.append(f"{rel}:{sub.lineno}: {sub.module}")
    assert sorted(set(late)) == []


def test_retry_strategies_count_from_one_and_the_last_repeats():
    from guard.controller.actions import strategy_for_retry
    from guard.policy import BacktrackSpec
    from guard.policy.build import default_controller_config, default_strategy

    spec = BacktrackSpec(strategies=[{"temperature": 0.5}, {"temperature": 0.9}])
    strategies = (default_strategy(temperature=0.5), default_strategy(temperature=0.9))
    config = default_controller_config(strategies=strategies)
    for retry, temp in [(1, 0.5), (2, 0.9), (5, 0.9)]:
        assert spec.strategy(retry).temperature == temp
        assert config.strategy(retry).temperature == temp
    for lookup in (spec.strategy, config.strategy, lambda r: strategy_for_retry([1], r)):
        with pytest.raises(ValueError, match="retries count from 1"):
            lookup(0)


def test_the_log_alias_reads_as_shadow_in_the_policy_and_the_controller():
    from guard.controller.backtrack import BoundMonitor
    from guard.policy import ResetTokenMonitorSpec

    spec = ResetTokenMonitorSpec(kind="reset_token", name="r", action="log")
    assert spec.action == "shadow"
    assert BoundMonitor(monitor=None, action="log").action == "shadow"  # type: ignore[arg-type]


def test_runtime_settings_declare_no_defaults_of_their_own(tmp_path):
    """The policy schema is the one place a setting's default is declared: the runtime dataclasses
    guard.policy.build makes from it carry none (a default added back would be a second copy that
    can drift), and the build helpers give the schema's defaults."""
    import dataclasses

    from guard.controller.backtrack import ControllerConfig, Strategy
    from guard.controller.deliberation import DeliberationConfig
    from guard.engine.vllm_engine import VLLMOptions  # imports no vllm until an engine loads
    from guard.policy import Policy
    from guard.policy.build import (
        controller_config,
        default_controller_config,
        default_deliberation_config,
        default_strategy,
        default_vllm_options,
    )
    from guard.policy.schema import DeliberationSpec, ResampleStrategy, VLLMSpec

    not_configured = {ControllerConfig: {"cut_separator"}, VLLMOptions: {"seed"}}
    for cls in (ControllerConfig, Strategy, DeliberationConfig, VLLMOptions):
        defaulted = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        assert defaulted == not_configured.get(cls, set()), cls.__name__
    policy = Policy(name="p", model={"engine": "vllm", "path": str(tmp_path / "m")})
    assert default_controller_config() == controller_config(policy)
    assert dataclasses.asdict(default_strategy()) == ResampleStrategy().model_dump()
    vllm = dataclasses.asdict(default_vllm_options())
    assert vllm.pop("seed") == 0
    assert vllm == VLLMSpec().model_dump()
    delib = dataclasses.asdict(default_deliberation_config())
    assert delib.pop("spec") == ""
    assert delib == DeliberationSpec().model_dump(include=set(delib))


def test_the_monitor_layers_aggregation_defaults_are_the_schemas():
    """``AggregationSpec`` is the monitors layer's value type, also written into probe files, and
    keeps defaults for artifacts made without a policy (``guard probe train``); the policy schema's
    aggregation block must give the same ones, or a policy and a probe file would disagree."""
    import dataclasses

    from guard.monitors.base import AggregationSpec
    from guard.policy.build import aggregation
    from guard.policy.schema import AggregationConfig

    assert dataclasses.asdict(AggregationSpec()) == AggregationConfig().model_dump()
    assert aggregation(AggregationConfig()) == AggregationSpec()
