"""Runtime objects built from a validated policy: the one place schema fields become engine,
monitor and controller settings.

One factory per engine kind (:data:`ENGINE_FACTORIES`) and per monitor kind
(:data:`MONITOR_FACTORIES`); :func:`controller_config` maps the ``backtrack``, ``stream``,
``deliberation`` and ``on_monitor_error`` sections. The runtime dataclasses these build
(:class:`~guard.controller.backtrack.ControllerConfig`, ``VLLMOptions``,
:class:`~guard.monitors.base.AggregationSpec`) never import the policy package; this module is the
only bridge, so the schema stays the one source of what a policy configures.

Importing this module loads torch (through the controller and the engines); the policy CLI's
``guard policy check`` without a model does not import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guard.controller.backtrack import BoundMonitor, ControllerConfig, Strategy
from guard.controller.deliberation import DeliberationConfig
from guard.engine.base import Engine
from guard.engine.transformers_engine import TransformersEngine
from guard.errors import ModelLoadError
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.monitors.reset_token import ResetTokenMonitor
from guard.policy.schema import (
    NATIVE_RESET,
    AggregationConfig,
    BacktrackSpec,
    DeliberationSpec,
    ModelSpec,
    Policy,
    ProbeMonitorSpec,
    ResampleStrategy,
    ResetTokenMonitorSpec,
    SaeMonitorSpec,
    StreamSpec,
    VLLMSpec,
)
from guard.sae.formats import load_sae
from guard.sae.monitor import SaeFeatureMonitor, WatchedFeature


def engine_key(spec: ModelSpec) -> tuple:
    """What makes two policies' engines the same engine (an engine is shared when the keys match)."""
    vllm = spec.vllm.model_dump_json() if spec.vllm is not None else None
    return (
        spec.engine,
        str(Path(spec.path).resolve()),
        spec.dtype,
        spec.device,
        spec.max_context,
        vllm,
    )


def _transformers_engine(spec: ModelSpec) -> Engine:
    return TransformersEngine.load(
        spec.path,
        dtype=spec.dtype,
        device=spec.device,
        name=spec.served_name,
        max_context=spec.max_context,
    )


def vllm_options(spec: VLLMSpec | None) -> Any:
    """The vLLM engine's options from the policy's ``model.vllm`` block (every field maps by name)."""
    # vllm_engine is imported only here: it needs the optional vllm package at load time.
    from guard.engine.vllm_engine import VLLMOptions

    return VLLMOptions(**(spec or VLLMSpec()).model_dump())


def default_vllm_options(**overrides: Any) -> Any:
    """The vLLM options of a policy that sets none, with ``overrides`` (library callers, tests)."""
    return vllm_options(VLLMSpec().model_copy(update=overrides))


def _vllm_engine(spec: ModelSpec) -> Engine:
    from guard.engine.vllm_engine import VLLMEngine  # optional heavy dependency (vllm)

    return VLLMEngine.load(
        spec.path,
        dtype=spec.dtype,
        name=spec.served_name,
        max_context=spec.max_context,
        options=vllm_options(spec.vllm),
    )


ENGINE_FACTORIES: dict[str, Callable[[ModelSpec], Engine]] = {
    "transformers": _transformers_engine,
    "vllm": _vllm_engine,
}
"""Engine kind (``model.engine``) -> the factory that loads it."""


def build_engine(spec: ModelSpec) -> Engine:
    """Load the engine ``spec`` names."""
    return ENGINE_FACTORIES[spec.engine](spec)


def aggregation(config: AggregationConfig | None) -> AggregationSpec | None:
    """The monitor's aggregation; ``None`` keeps the monitor file's own."""
    if config is None:
        return None
    return AggregationSpec(kind=config.kind, alpha=config.alpha, window=config.window)


def probe_monitor(spec: ProbeMonitorSpec) -> ProbeMonitor:
    """Load a probe monitor as the policy configures it (not yet checked against a model)."""
    return ProbeMonitor.load(
        spec.path,
        name=spec.name,
        layer=spec.layer,
        threshold=spec.threshold,
        aggregation=aggregation(spec.aggregation),
    )


def _probe(spec: ProbeMonitorSpec, policy: Policy, engine: Engine) -> BoundMonitor:
    mon = probe_monitor(spec)
    mon.check_compatible(engine.info, policy.model.path)
    return BoundMonitor(mon, action=spec.action, scope=spec.scope)


def sae_monitor(spec: SaeMonitorSpec, engine: Engine) -> SaeFeatureMonitor:
    """Build an SAE feature monitor from its policy spec and check it fits the engine's model."""
    sae = load_sae(spec.path, format=spec.format, layer=spec.layer)
    if sae.layer is None:
        raise ModelLoadError(
            f"SAE monitor '{spec.name}': {spec.path} names no hook point; set `layer:` in the "
            "policy to the engine layer it was trained on"
        )
    feats = [WatchedFeature(f.index, f.threshold, f.weight) for f in spec.features]
    try:
        mon = SaeFeatureMonitor(
            spec.name,
            sae,
            feats,
            rule=spec.rule,
            weighted_threshold=spec.weighted_threshold,
            aggregation=aggregation(spec.aggregation),
            topk_threshold=spec.topk_threshold,
        )
    except ValueError as exc:
        raise ModelLoadError(f"SAE monitor '{spec.name}' ({spec.path}): {exc}") from exc
    mon.check_compatible(engine.info)
    return mon


def _sae(spec: SaeMonitorSpec, policy: Policy, engine: Engine) -> BoundMonitor:
    return BoundMonitor(sae_monitor(spec, engine), action=spec.action, scope=spec.scope)


def _reset_token(spec: ResetTokenMonitorSpec, policy: Policy, engine: Engine) -> BoundMonitor:
    mon = ResetTokenMonitor.from_tokenizer(engine.tokenizer, spec.token, name=spec.name)
    # A model-native reset condemns everything it said before it, shown or not: cut back to the
    # response start (a plain client that was shown some of it gets a Cut, not a continuation).
    return BoundMonitor(
        mon, action=spec.action, rollback="response", scope=spec.scope, condemns_shown=True
    )


MONITOR_FACTORIES: dict[str, Callable[[Any, Policy, Engine], BoundMonitor]] = {
    "probe": _probe,
    "sae": _sae,
    "reset_token": _reset_token,
}
"""Monitor kind (``monitors[].kind``) -> the factory that builds it against an engine."""


def build_monitor(spec: Any, policy: Policy, engine: Engine) -> BoundMonitor:
    """Build the monitor ``spec`` configures, bound with its action and scope, checked against ``engine``."""
    return MONITOR_FACTORIES[spec.kind](spec, policy, engine)


def native_reset_spec(policy: Policy, tokenizer: Any) -> ResetTokenMonitorSpec | None:
    """The monitor guard adds for the model's own reset token, or ``None``.

    ``None`` when ``model.native_reset_token`` is null, when the policy lists a ``reset_token``
    monitor itself (it configured the model's resets explicitly), or when the vocabulary has no
    such single token (most models: they were not trained to backtrack). A model that emits its
    reset token has withdrawn what it wrote before it; without this monitor that text would stay
    in the answer with only the token itself hidden."""
    token = policy.model.native_reset_token
    if token is None or any(m.kind == "reset_token" for m in policy.monitors):
        return None
    if tokenizer.token_id(token) is None:
        return None
    return ResetTokenMonitorSpec(kind="reset_token", name=NATIVE_RESET, token=token)


def build_monitors(policy: Policy, engine: Engine) -> list[BoundMonitor]:
    """Every monitor the policy acts with: its listed ``monitors``, then the model's own reset token
    (:func:`native_reset_spec`) when it applies."""
    monitors = [build_monitor(spec, policy, engine) for spec in policy.monitors]
    native = native_reset_spec(policy, engine.tokenizer)
    if native is not None:
        monitors.append(build_monitor(native, policy, engine))
    return monitors


def strategy(spec: ResampleStrategy) -> Strategy:
    """A retry's resampling strategy."""
    return Strategy(**spec.model_dump())


def default_strategy(**overrides: Any) -> Strategy:
    """The schema's default resampling strategy with ``overrides`` (library callers, tests)."""
    return strategy(ResampleStrategy().model_copy(update=overrides))


def _deliberation(d: DeliberationSpec, spec: str) -> DeliberationConfig:
    return DeliberationConfig(
        mode=d.mode,
        spec=spec,
        instruction=d.instruction,
        placement=d.placement,
        open_tag=d.open_tag,
        close_tag=d.close_tag,
        max_reasoning_tokens=d.max_reasoning_tokens,
        risk_monitor=d.risk_monitor,
    )


def deliberation_config(policy: Policy) -> DeliberationConfig | None:
    """The controller's deliberation settings; ``None`` when the policy never deliberates."""
    d = policy.deliberation
    if d.mode == "off" and not any(s.deliberate for s in policy.backtrack.strategies):
        return None
    return _deliberation(d, d.spec_text())


def default_deliberation_config(spec: str = "", **overrides: Any) -> DeliberationConfig:
    """The schema's default deliberation section with ``overrides`` and the spec text ``spec``."""
    return _deliberation(DeliberationSpec().model_copy(update=overrides), spec)


def _controller(
    bt: BacktrackSpec,
    stream: StreamSpec,
    on_monitor_error: Any,
    deliberation: DeliberationConfig | None,
) -> ControllerConfig:
    return ControllerConfig(
        rollback=bt.rollback,
        rollback_tokens=bt.rollback_tokens,
        max_retries=bt.max_retries,
        safe_level=bt.safe_level,
        retry_threshold=bt.retry_threshold,
        garble_margin=bt.garble_margin,
        garble_window=bt.garble_window,
        refusal=bt.refusal,
        holdback_tokens=stream.holdback_tokens,
        reset_marker=stream.reset_marker,
        release_margin=stream.release_margin,
        on_monitor_error=on_monitor_error,
        strategies=tuple(strategy(s) for s in bt.strategies),
        deliberation=deliberation,
    )


def controller_config(policy: Policy) -> ControllerConfig:
    """The controller's settings from the policy's backtrack, stream and deliberation sections."""
    return _controller(
        policy.backtrack, policy.stream, policy.on_monitor_error, deliberation_config(policy)
    )


def default_controller_config(**overrides: Any) -> ControllerConfig:
    """The controller settings of a policy that sets no backtrack, stream, deliberation or
    ``on_monitor_error``, with ``overrides`` as keyword arguments (library callers, tests,
    benchmarks): the schema's defaults, never a second copy of them."""
    on_error = Policy.model_fields["on_monitor_error"].default
    config = _controller(BacktrackSpec(), StreamSpec(), on_error, None)
    return dataclasses.replace(config, **overrides)
