"""What ``guard serve`` would refuse about a valid policy, found from the model's config and
tokenizer alone (no weights loaded), for ``guard policy check``; and the stream exposure bound.

Checks, each reported as one line naming the field: the model directory has a readable config
and tokenizer; every probe and SAE monitor reads a layer the model has, with the model's
``d_model``; every ``reset_token`` monitor's token is one token of the vocabulary; a deliberating
policy's forced prefix (open tag, instruction, spec, close tag) fits in the context window with
room to answer. Contract: :func:`model_errors` never raises for a bad model or monitor file; it
returns the messages ``guard serve`` would fail with (the same checks the service runs at start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.controller.deliberation import forced_prefix, system_prompt
from guard.engine import vllm_parallel
from guard.errors import GuardError, ModelLoadError
from guard.policy.build import build_monitor, native_reset_spec
from guard.policy.schema import NATIVE_RESET, Policy, ResetTokenMonitorSpec


@dataclass(frozen=True)
class ModelFacts:
    """The model as the checks see it (the engine's ``ModelInfo`` without loading weights)."""

    name: str
    num_layers: int
    d_model: int
    vocab_size: int
    context_length: int
    eos_token_ids: frozenset[int] = frozenset()


class _ConfigOnlyEngine:
    """Enough of an engine for the monitors' own compatibility checks: ``info`` and ``tokenizer``."""

    def __init__(self, info: ModelFacts, tokenizer: Any) -> None:
        self.info, self.tokenizer = info, tokenizer


def model_errors(policy: Policy) -> list[str]:
    """Problems ``guard serve`` would stop at for ``policy``, as ``field: message`` lines (none for a
    vLLM policy naming a hub model rather than a local directory: there is nothing local to read)."""
    if policy.model.engine == "vllm" and not Path(policy.model.path).exists():
        return []
    try:
        engine = _load(policy)
    except GuardError as exc:
        return [f"model.path: {exc.message}"]
    errors = [
        f"monitors[{i}] ({spec.name}): {msg}"
        for i, spec in enumerate(policy.monitors)
        if (msg := _monitor_error(spec, policy, engine)) is not None
    ]
    errors += _deliberation_errors(policy, engine)
    return errors


def _load(policy: Policy) -> _ConfigOnlyEngine:
    from transformers import AutoConfig, AutoTokenizer

    from guard.engine.transformers_engine import HFChatTokenizer

    spec, path = policy.model, Path(policy.model.path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a HF model directory (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the config or tokenizer from {path}: {exc}") from exc
    cfg = (
        getattr(cfg, "text_config", None) or cfg
    )  # multimodal configs keep the language model's inside
    ctx = int(getattr(cfg, "max_position_embeddings", 2048))
    info = ModelFacts(
        name=spec.served_name or policy.name,
        num_layers=int(cfg.num_hidden_layers),
        d_model=int(cfg.hidden_size),
        vocab_size=int(cfg.vocab_size),
        context_length=min(ctx, spec.max_context or ctx),
    )
    return _ConfigOnlyEngine(info, HFChatTokenizer(tok))


def _monitor_error(spec: Any, policy: Policy, engine: _ConfigOnlyEngine) -> str | None:
    """The error building this monitor against the model would raise (as the service builds it)."""
    from guard.policy.build import build_monitor  # loads torch: only when a model is checked

    try:
        build_monitor(spec, policy, engine)  # type: ignore[arg-type]
    except GuardError as exc:
        return exc.message
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _deliberation_errors(policy: Policy, engine: _ConfigOnlyEngine) -> list[str]:
    d = policy.deliberation
    if d.mode == "off" and not any(s.deliberate for s in policy.backtrack.strategies):
        return []
    tok, ctx = engine.tokenizer, engine.info.context_length
    if d.placement == "system":
        forced = len(tok.encode(system_prompt(d.instruction, d.spec_text())))
        what = "the spec as a system message"
    else:
        forced = len(tok.encode(forced_prefix(d.open_tag, d.instruction, d.spec_text()))) + len(
            tok.encode(d.close_tag)
        )
        what = "the forced reasoning prefix (open tag, instruction, spec) and close tag"
    if forced + 1 >= ctx:
        return [
            (
                f"deliberation: {what} take {forced} tokens; the context window is {ctx} tokens, leaving no room "
                "for a prompt and an answer (shorten the spec or raise model.max_context)"
            )
        ]
    return []


def native_reset_line(policy: Policy) -> tuple[str, bool]:
    """What ``guard serve`` does with the model's own reset token (``model.native_reset_token``),
    read from the tokenizer alone, and whether it acts on it; the caller has checked the model
    loads."""
    token = policy.model.native_reset_token
    if token is None:
        return ("# native reset: off (model.native_reset_token: null)", False)
    if any(m.kind == "reset_token" for m in policy.monitors):
        return ("# native reset: configured by the policy's own reset_token monitor", False)
    if not Path(policy.model.path).exists():
        return (
            f"# native reset: model not local, unknown whether its vocabulary has {token!r}",
            False,
        )
    tokenizer = _load(policy).tokenizer
    spec = native_reset_spec(policy, tokenizer)
    if spec is None:
        return (f"# native reset: none (the vocabulary has no token {token!r})", False)
    return (
        (
            f"# native reset: the model's own {token!r} (id {tokenizer.token_id(token)}) acts as "
            f"monitor '{spec.name}' (action backtrack, rollback to the response start)"
        ),
        True,
    )


def exposure_lines(policy: Policy, *, native_reset: bool = False) -> list[str]:
    """How much streamed text a client can be shown and then lose, per client kind (policy only;
    ``native_reset``: the model's own reset token acts too, see :func:`native_reset_line`)."""
    s, bt, d = policy.stream, policy.backtrack, policy.defaults
    h, whole = s.holdback_tokens, max(0, d.max_tokens - s.holdback_tokens)
    acting: list[Any] = [
        m for m in policy.monitors if m.action in ("backtrack", "refuse") and m.scope != "prompt"
    ]
    if native_reset:
        acting.append(ResetTokenMonitorSpec(kind="reset_token", name=NATIVE_RESET))
    if not acting:
        return [
            "# stream exposure: no monitor acts on the output, so no client is ever shown text that is retracted"
        ]
    # A reset-token firing and a refuse action cut back to the response start whatever the policy's rule.
    # rollback auto may find no safe prefix (then the response start), and a garble firing always cuts there.
    rules = {
        "response"
        if m.kind == "reset_token" or m.action == "refuse" or bt.rollback == "auto"
        else bt.rollback
        for m in acting
    }
    if bt.garble_margin is not None:
        rules.add("response")
    if bt.max_retries >= 2:  # a kept prefix is trusted once: the next rollback after it goes there
        rules.add("response")
    if "response" in rules:
        per_reset = f"everything shown (up to max_tokens - holdback_tokens = {whole} tokens)"
    elif "sentence" in rules:
        per_reset = "the sentence being written, less the last holdback_tokens (not bounded by the policy alone)"
    else:
        per_reset = f"{max(0, bt.rollback_tokens - h)} tokens (rollback_tokens {bt.rollback_tokens} - holdback {h})"
    return [
        "# stream exposure (tokens a client is shown and then loses):",
        (
            f"#   reset-aware clients (stream_options.guard_resets): one reset retracts at most {per_reset}; a refusal "
            f"past the retry budget retracts all of it (up to {whole} tokens)"
        ),
        (
            "#   other clients: 0: text is shown once settled (past the hold-back, every acting monitor's score below "
            f"threshold * {1 - s.release_margin:g} since); a rollback reaching shown text ends the answer "
            "(finish_reason content_filter, the refusal as a separate part) instead of retracting it"
        ),
    ]


def policy_layout_lines(policy: Any) -> list[str]:
    """:func:`layout_lines` for a vLLM policy, with its activation monitors built as ``guard serve``
    builds them (against the model's config; the caller has checked they build)."""
    spec = policy.model.vllm
    tp, pp, dp = (
        (spec.tensor_parallel_size, spec.pipeline_parallel_size, spec.data_parallel_size)
        if spec is not None
        else (1, 1, 1)
    )
    if not Path(policy.model.path).exists():
        head = f"# vllm parallel layout: tensor {tp} x pipeline {pp} x data {dp} = {tp * pp * dp} worker(s)"
        return [head + " (model not local: stages unknown)"]
    engine = _load(policy)
    mons = [
        build_monitor(m, policy, engine).monitor  # type: ignore[arg-type]
        for m in policy.monitors
    ]
    layered = [(m.name, m.layer) for m in mons if m.layer is not None]
    return vllm_parallel.layout_lines(engine.info.num_layers, tp, pp, dp, layered)
