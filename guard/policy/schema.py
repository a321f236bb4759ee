"""The policy file schema: one YAML file says what model to serve and how to guard it.

Every model forbids unknown fields and every field carries a description, so a typo fails loudly
and the reference docs can be generated from the schema. Paths are resolved against the policy
file's directory when the file is validated with a ``base_dir`` context (see
:func:`guard.policy.load_policy`); built in Python without one, paths stay as given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from guard.controller.actions import Action, Rollback, Scope, canonical_action, strategy_for_retry
from guard.controller.deliberation import DEFAULT_INSTRUCTION
from guard.errors import PolicyError
from guard.policy.cross import CROSS_FIELD, cross_field_errors
from guard.policy.paths import check_files, check_location, read_spec

NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

# ``log``, the earlier name of ``shadow``, is still accepted and reads back as ``shadow``.
MonitorAction = Annotated[Action, BeforeValidator(canonical_action)]


NATIVE_RESET = "native_reset"
"""Name of the monitor guard builds from the model's own reset token (``model.native_reset_token``)."""


def _action_field() -> Any:
    return Field(
        "backtrack",
        description="What a firing does. backtrack: roll back and resample (past the retry "
        "budget, refuse); refuse: answer the policy's refusal at once, retracting "
        "what was sent; shadow: only record the firing (log-only, the answer is "
        "unchanged: to review a new monitor on live traffic before it acts; "
        "log is accepted as an alias and reads back as shadow). On the prompt, "
        "backtrack and refuse both refuse before generating.",
    )


def _scope_field() -> Any:
    return Field(
        "output",
        description="What the monitor reads. output: the generated tokens; prompt: the prompt "
        "tokens, once at prefill, before anything is generated; both: each.",
    )


class Strict(BaseModel):
    """Base of every policy model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


def _resolve(path: Path, info: ValidationInfo, must_exist: bool, what: str) -> Path:
    """Resolve ``path`` against the policy directory; raise if it must exist and does not."""
    ctx = info.context or {}
    base = ctx.get("base_dir")
    if base is not None and not path.is_absolute():
        path = (Path(base) / path).resolve()
    if must_exist and ctx.get("check_paths", False) and not path.exists():
        raise PydanticCustomError(
            "path_missing", "{what} not found: {path}", {"what": what, "path": str(path)}
        )
    return path


def _artifact(path: Path, info: ValidationInfo, what: str) -> Path:
    """A spec, probe or SAE path: resolved, and held to the rules of :mod:`guard.policy.paths`."""
    path = _resolve(path, info, must_exist=True, what=what)
    ctx = info.context or {}
    base = ctx.get("base_dir")
    try:
        check_location(path, what, Path(base) if base is not None else None)
        if ctx.get("check_paths", False):
            check_files(path, what)
    except (ValueError, OSError) as exc:
        raise PydanticCustomError("path_not_allowed", "{error}", {"error": str(exc)}) from None
    return path


class VLLMSpec(Strict):
    """Settings of the vLLM engine (``engine: vllm``)."""

    gpu_memory_utilization: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="Share of accelerator memory vLLM may "
        "use for weights and KV cache (on CPU: of the KV space it reserves).",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most requests vLLM runs in one batch.")
    block_size: int | None = Field(
        None,
        ge=1,
        description="KV block size in tokens (prefix-cache granularity: a "
        "rollback recomputes less than one block); the platform's default when unset "
        "(the CPU backend needs a multiple of 32).",
    )
    reset_token: str = Field(
        "<|reset|>",
        description="Token forced (and listed in stop_token_ids) when an acting "
        "monitor fires inside the vLLM worker, if the vocabulary has "
        "it; otherwise the engine picks a reserved id itself (a spare "
        "embedding row, a reserved special token or the padding id, "
        "then banned from sampling), logs it, and `guard policy check` "
        "reports it.",
    )
    reset_token_id: int | None = Field(
        None, ge=0, description="Id to force instead: a reserved id the model never samples."
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM tensor parallelism: workers each holding a slice "
        "of every layer. Every rank holds the full residual "
        "stream after the all-reduce: all run the monitors, "
        "rank 0 reports their scores.",
    )
    pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM pipeline parallelism: stages each holding a run "
        "of layers; a monitor runs on the stage that holds its "
        "layer (`guard policy check` prints which).",
    )
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM data parallelism: engine cores each running a whole "
        "replica on its own requests; each gets every monitor.",
    )
    enforce_eager: bool = Field(
        False,
        description="Run the model eagerly (no torch.compile, no CUDA graphs). Off: "
        "monitors and steering run inside vLLM's compiled graph as the guard::layer op.",
    )


class ModelSpec(Strict):
    """The model the policy serves."""

    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="Runtime that runs the model."
    )
    path: Path = Field(
        description="Model directory (relative to the policy file). Must exist for engine "
        "transformers; for vllm a path that does not exist is kept as a hub id."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight dtype; auto takes the checkpoint's (float32 on CPU)."
    )
    device: str = Field(
        "auto", description="Torch device (cpu, cuda, cuda:1) or auto (cuda when available)."
    )
    served_name: str | None = Field(
        None,
        description="Name /v1/models reports for the underlying model; "
        "defaults to the policy name.",
    )
    max_context: int | None = Field(
        None, ge=1, description="Context window in tokens; defaults to the model's."
    )
    vllm: VLLMSpec | None = Field(None, description="vLLM settings (engine vllm only).")
    native_reset_token: str | None = Field(
        "<|reset|>",
        min_length=1,
        description="The reset token of a model trained to backtrack: it emits it right after "
        "it notices it began an unsafe answer. When the vocabulary has this token and no "
        "monitor of kind reset_token is listed, guard acts on it as a monitor named "
        f"'{NATIVE_RESET}' (action backtrack, rollback to the response start), so what the "
        "model itself withdrew is not kept; `guard policy check` reports it. null ignores it.",
    )

    @model_validator(mode="after")
    def _vllm_only_for_vllm(self) -> ModelSpec:
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError("vllm settings are only allowed with engine: vllm")
        return self

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: Path, info: ValidationInfo) -> Path:
        if info.data.get("engine") == "vllm":
            resolved = _resolve(path, info, must_exist=False, what="model")
            return resolved if resolved.exists() else path
        return _resolve(path, info, must_exist=True, what="model directory")


class AggregationConfig(Strict):
    """How per-token probe scores become the score compared with the threshold."""

    kind: Literal["none", "ema", "window"] = Field(
        "ema",
        description="none: raw score; ema: exponential moving "
        "average; window: mean of the last tokens.",
    )
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="EMA weight of the newest token.")
    window: int = Field(4, ge=1, description="Window length in tokens for kind window.")


class ProbeMonitorSpec(Strict):
    """A linear probe on the model's residual stream."""

    kind: Literal["probe"] = Field(description="Monitor type.")
    name: str = Field(
        pattern=NAME_PATTERN, description="Unique monitor name (appears in logs and reset events)."
    )
    path: Path = Field(description="Probe directory (relative to the policy file).")
    layer: int | None = Field(
        None, ge=0, description="Layer whose output the probe reads; defaults to the probe file's."
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fire when the aggregated score exceeds this; defaults to the probe file's.",
    )
    aggregation: AggregationConfig | None = Field(
        None, description="Score aggregation; defaults to the probe file's."
    )
    action: MonitorAction = _action_field()
    scope: Scope = _scope_field()

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: Path, info: ValidationInfo) -> Path:
        return _artifact(path, info, "probe directory")


class ResetTokenMonitorSpec(Strict):
    """Fires when the model itself emits a reset token (a model trained to backtrack)."""

    kind: Literal["reset_token"] = Field(description="Monitor type.")
    name: str = Field(pattern=NAME_PATTERN, description="Unique monitor name.")
    token: str = Field(
        "<|reset|>", min_length=1, description="The special token that signals a reset."
    )
    action: MonitorAction = _action_field()
    scope: Scope = _scope_field()


class SaeFeatureSpec(Strict):
    """One SAE feature an SAE monitor watches."""

    index: int = Field(ge=0, description="Feature (latent) index in the SAE, 0-based.")
    threshold: float = Field(
        gt=0.0, description="The feature counts as active above this activation."
    )
    weight: float = Field(
        1.0, description="Weight in the weighted rule and in the steering direction."
    )


class SaeMonitorSpec(Strict):
    """Watches a few features of a sparse autoencoder on one layer's residual stream."""

    kind: Literal["sae"] = Field(description="Monitor type.")
    name: str = Field(
        pattern=NAME_PATTERN, description="Unique monitor name (appears in logs and reset events)."
    )
    path: Path = Field(description="SAE directory or weights file (relative to the policy file).")
    format: Literal["auto", "saelens", "gemmascope", "sparsify", "goodfire"] = Field(
        "auto", description="SAE file format; auto detects it from the files present."
    )
    layer: int | None = Field(
        None,
        ge=0,
        description="Engine layer (output of decoder block L) the SAE reads; "
        "required when the file names no hook (Gemma Scope, "
        "Goodfire), else it must match the file's hook.",
    )
    features: list[SaeFeatureSpec] = Field(min_length=1, description="The watched features.")
    rule: Literal["any", "all", "weighted"] = Field(
        "any",
        description="any: some feature exceeds its threshold; all: every one does; weighted: the "
        "weighted sum of activations exceeds weighted_threshold.",
    )
    weighted_threshold: float | None = Field(
        None,
        gt=0.0,
        description="Threshold of the weighted sum for rule "
        "weighted; defaults to the sum of "
        "weight * threshold.",
    )
    aggregation: AggregationConfig | None = Field(
        None,
        description="Score aggregation; defaults to none (fire on "
        "the first token that meets the rule).",
    )
    topk_threshold: float | None = Field(
        None,
        ge=0.0,
        description="TopK SAEs only: a watched feature counts as active when its pre-activation "
        "exceeds this calibrated threshold (TopK membership would need all d_sae "
        "pre-activations; this is the BatchTopK -> JumpReLU approximation). Defaults to "
        "the SAE file's threshold, else 0 (plain ReLU, which can only over-fire).",
    )
    action: MonitorAction = _action_field()
    scope: Scope = _scope_field()

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: Path, info: ValidationInfo) -> Path:
        return _artifact(path, info, "SAE")

    @model_validator(mode="after")
    def _check_rule(self) -> SaeMonitorSpec:
        if self.weighted_threshold is not None and self.rule != "weighted":
            raise ValueError(
                f"weighted_threshold only applies to rule weighted (rule is {self.rule})"
            )
        indices = [f.index for f in self.features]
        if len(set(indices)) != len(indices):
            raise ValueError(
                f"features list an index twice: {sorted(i for i in set(indices) if indices.count(i) > 1)}"
            )
        return self


MonitorSpec = Annotated[
    ProbeMonitorSpec | ResetTokenMonitorSpec | SaeMonitorSpec, Field(discriminator="kind")
]


class ResampleStrategy(Strict):
    """How one retry resamples from the rollback point."""

    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Temperature of the retry; null keeps the request's."
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="top_p of the retry; null keeps the request's."
    )
    reseed: bool = Field(
        True, description="Draw a fresh seed (the record keeps it, so the retry is reproducible)."
    )
    ban_first_token: bool = Field(
        True, description="Ban the discarded span's first token at the rollback point."
    )
    steer_alpha: float = Field(
        0.0,
        ge=0.0,
        description="While resampling, subtract alpha times the firing probe's "
        "unit direction at its layer; 0 turns steering off.",
    )
    deliberate: bool = Field(
        False,
        description="Switch deliberation on for the retry: roll back to the response "
        "start and force the reasoning opener and spec there (needs a "
        "deliberation spec; placement reasoning).",
    )


class BacktrackSpec(Strict):
    """What happens when a monitor fires."""

    rollback: Rollback = Field(
        "response",
        description="How far to cut back (default response: chosen by bench/rollback_choice.py, "
        "rule 2). response: the whole response, nothing a condemned attempt wrote is kept (for a "
        "client that cannot take text back, the text it was already shown is kept: it settled "
        "under the release margin; a firing inside it ends the answer); "
        "auto: to the end of the longest prefix in which every "
        "acting monitor's aggregated score stayed below safe_level times its threshold "
        "(the response start if none did); tokens: a fixed number of tokens; sentence: "
        "the start of the sentence holding the fired token. A kept prefix is trusted once: "
        "when the retry that resumed after it is rolled back too, that rollback goes to the "
        "response start.",
    )
    rollback_tokens: int = Field(
        4, ge=1, description="Tokens cut before the fired token for rollback tokens."
    )
    safe_level: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="For rollback auto: the fraction of each monitor's threshold its "
        "aggregated score must stay below for a prefix to be kept. At most "
        "retry_threshold, so a kept prefix passes the stricter retry threshold.",
    )
    retry_threshold: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Once a monitor fires, its threshold for the rest of the generation "
        "is this times its own: a resample must look clearly safer than the "
        "text it replaces (1: retries judged exactly like the first attempt).",
    )
    garble_margin: float | None = Field(
        1.5,
        gt=0.0,
        description="A resample whose mean surprisal (nats per token, the model's own -log p) over its "
        "first garble_window tokens exceeds the first attempt's by more than this is "
        "treated as a firing (monitor 'garble' in the log): text the model itself finds "
        "far less likely than what it wrote unprompted is outside what monitors were "
        "trained on. null turns the check off.",
    )
    garble_window: int = Field(
        8, ge=2, description="Resampled tokens the garble check averages over."
    )
    max_retries: int = Field(
        3, ge=0, description="Resamples allowed per generation before giving up."
    )
    on_exhausted: Literal["refuse"] = Field(
        "refuse", description="What to do once the retries are spent."
    )
    refusal: str = Field(
        "I can't help with that.", description="Answer sent when the generation is refused."
    )
    strategies: list[ResampleStrategy] = Field(
        default_factory=lambda: [ResampleStrategy()],
        min_length=1,
        description="Strategy i is used for retry i (1-based); the last one repeats.",
    )

    @model_validator(mode="after")
    def _safe_below_retry(self) -> BacktrackSpec:
        if self.safe_level > self.retry_threshold:
            raise PydanticCustomError(
                "safe_level",
                "safe_level ({safe}) must not exceed retry_threshold ({retry})",
                {
                    "safe": self.safe_level,
                    "retry": self.retry_threshold,
                    "loc_suffix": ("safe_level",),
                },
            )
        return self

    def strategy(self, retry: int) -> ResampleStrategy:
        """The strategy for the ``retry``-th retry (1 for the first; the last one repeats)."""
        return strategy_for_retry(self.strategies, retry)


class StreamSpec(Strict):
    """Streaming behaviour."""

    holdback_tokens: int = Field(
        8,
        ge=0,
        description="Tokens kept back from the client so that most rollbacks "
        "never reach released text.",
    )
    reset_marker: str | None = Field(
        None,
        description="Text a reset event asks the client to show where text "
        "was retracted (e.g. '[RESET]').",
    )
    release_margin: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="For clients that did not opt in to resets: a token is shown once "
        "it is past holdback_tokens and every acting monitor's aggregated "
        "score stayed below threshold * (1 - release_margin) since; a "
        "rollback that would still reach shown text ends the answer with "
        "finish_reason content_filter and the refusal as a separate part.",
    )


class LogSpec(Strict):
    """The flagged-generation log: a SQLite file (path, the default) or a database URL (url, url_env).

    Several replicas share one log through a Postgres URL. Set at most one of path, url and url_env.
    """

    path: Path | None = Field(
        None,
        description="SQLite database (relative to the policy file); guard.db when "
        "neither url nor url_env is set.",
    )
    url: str | None = Field(
        None,
        description="Database URL instead of path: postgresql://USER@HOST:PORT/DB "
        "(needs pip install 'guard[postgres]') or sqlite:////ABS/PATH.db. "
        "Committed with the file: use url_env for a URL with a password.",
    )
    url_env: str | None = Field(
        None,
        pattern=ENV_PATTERN,
        description="Environment variable holding the database URL, read when the server "
        "loads the policy; an unset or empty variable is an error.",
    )
    record: Literal["flagged", "all"] = Field(
        "flagged",
        description="flagged: only generations where a monitor "
        "fired or that were refused; all: every one.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and all(data.get(k) is None for k in ("path", "url", "url_env")):
            return {**data, "path": "guard.db"}
        return data

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _resolve(path, info, must_exist=False, what="log database")

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None:
            _check_log_url(url)
        return url

    @model_validator(mode="after")
    def _one_target(self) -> LogSpec:
        given = [k for k in ("path", "url", "url_env") if getattr(self, k) is not None]
        if len(given) > 1:
            raise PydanticCustomError(
                "log_target",
                "set one of path, url and url_env, not {given}",
                {"given": " and ".join(given), "loc_suffix": (given[1],)},
            )
        return self

    def target(self, environ: Mapping[str, str]) -> str:
        """The store to open (a path or URL), ``url_env`` read from ``environ``; :class:`PolicyError`
        if that variable is unset or holds no usable URL."""
        if self.url_env is None:
            return self.url if self.url is not None else str(self.path)
        url = environ.get(self.url_env, "").strip()
        try:
            if not url:
                raise ValueError("unset or empty")
            _check_log_url(url)
        except ValueError as exc:
            raise PolicyError(
                self.url_env, [f"log.url_env: environment variable {self.url_env}: {exc}"]
            ) from None
        return url

    def keeps(self, flagged: bool) -> bool:
        """Whether a generation with this ``flagged`` status is written to the log."""
        return flagged or self.record == "all"


LOG_URL_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+psycopg")


def _check_log_url(url: str) -> None:
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme not in LOG_URL_SCHEMES:
        # The URL may hold a password: name only its scheme.
        raise ValueError(
            f"not a log database URL (SCHEME://..., SCHEME one of {', '.join(LOG_URL_SCHEMES)}; "
            + (f"got {scheme}://)" if scheme else "got no scheme)")
        )


class RequestDefaults(Strict):
    """Sampling defaults for requests that leave a parameter out."""

    max_tokens: int = Field(256, ge=1, description="Most output tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")


class AccessSpec(Strict):
    """Which API keys may use the policy (per-tenant policies).

    A key bound here may use only the policies that bind it and sees only those in /v1/models;
    keys from GUARD_API_KEYS stay global. Once any key is configured, every request needs one,
    and a policy without an access section is served to global keys only.
    """

    api_keys: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        default_factory=list,
        description="Keys bound to this policy. They are committed with the file: prefer "
        "api_key_env outside tests.",
    )
    api_key_env: list[Annotated[str, StringConstraints(pattern=ENV_PATTERN)]] = Field(
        default_factory=list,
        description="Environment variables holding keys (comma-separated) bound to this "
        "policy, read when the server loads the policy; an unset or empty "
        "variable is an error.",
    )

    @model_validator(mode="after")
    def _binds_a_key(self) -> AccessSpec:
        if not self.api_keys and not self.api_key_env:
            raise ValueError(
                "access binds no key: set api_keys or api_key_env, or remove the access section"
            )
        return self

    def resolve_keys(self, environ: Mapping[str, str]) -> frozenset[str]:
        """The bound keys, env variables read from ``environ``; :class:`PolicyError` if one is unset."""
        keys = set(self.api_keys)
        for i, var in enumerate(self.api_key_env):
            found = [k.strip() for k in environ.get(var, "").split(",") if k.strip()]
            if not found:
                raise PolicyError(
                    var, [f"access.api_key_env[{i}]: environment variable {var} is unset or empty"]
                )
            keys.update(found)
        return frozenset(keys)


class DeliberationSpec(Strict):
    """Deliberative reasoning: the model reasons over a written spec before it answers.

    The reasoning section (open tag through close tag) never reaches the client, is not scored by
    output monitors and is stored in the log beside the answer. Chat content can never open or
    close it: special tokens in message content are tokenized as plain text and tag text is broken
    with a zero-width joiner.
    """

    mode: Literal["off", "always", "on_risk"] = Field(
        "off",
        description="off: answer directly; always: deliberate on every request; on_risk: deliberate only "
        "when risk_monitor fires on the prompt (its firing never refuses).",
    )
    spec: str | None = Field(
        None,
        description="The spec text (rules the model reasons over). Exactly one of spec "
        "and spec_file is needed unless mode is off and no strategy "
        "deliberates.",
    )
    spec_file: Path | None = Field(
        None, description="File holding the spec (relative to the policy file)."
    )
    instruction: str = Field(
        DEFAULT_INSTRUCTION, min_length=1, description="Instruction put before the spec."
    )
    placement: Literal["reasoning", "system"] = Field(
        "reasoning",
        description="reasoning: force open tag, instruction and spec at the start of the answer (any "
        "mode); system: put instruction and spec in a system message (mode always only), "
        "for reasoning models that open their own section.",
    )
    open_tag: str = Field(
        "<|think|>", min_length=1, description="Text (or special token) opening the section."
    )
    close_tag: str = Field(
        "<|/think|>", min_length=1, description="Text (or special token) closing the section."
    )
    max_reasoning_tokens: int = Field(
        128,
        ge=1,
        description="Sampled reasoning tokens before the close tag is "
        "forced (the forced spec does not count).",
    )
    risk_monitor: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Monitor (scope prompt or both) whose prompt firing switches "
        "deliberation on; required for on_risk.",
    )

    @field_validator("spec_file")
    @classmethod
    def _check_spec_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _artifact(path, info, "spec file")

    @model_validator(mode="after")
    def _check(self) -> DeliberationSpec:
        if self.spec is not None and self.spec_file is not None:
            raise ValueError("set spec or spec_file, not both")
        if self.mode != "off" and self.spec is None and self.spec_file is None:
            raise ValueError(f"mode {self.mode} needs spec or spec_file")
        if self.mode == "on_risk" and self.risk_monitor is None:
            raise ValueError(
                "mode on_risk needs risk_monitor (a monitor with scope prompt or both)"
            )
        if self.placement == "system" and self.mode == "on_risk":
            raise ValueError(
                "placement system only works with mode always (the spec goes in before the prompt "
                "is scored); use placement reasoning for on_risk"
            )
        return self

    def spec_text(self) -> str:
        """The spec, read from ``spec_file`` if set ('' if neither is set)."""
        if self.spec_file is not None:
            return read_spec(Path(self.spec_file))
        return self.spec or ""


class Policy(Strict):
    """One guarded model: what to serve, what to watch, and what to do when a monitor fires."""

    name: str = Field(pattern=NAME_PATTERN, description="Model alias served at /v1/models.")
    description: str = Field("", description="Free text shown by `guard policy check`.")
    model: ModelSpec = Field(description="The underlying model.")
    monitors: list[MonitorSpec] = Field(
        default_factory=list,
        description="Monitors, in the order they are checked; names must be unique.",
    )
    on_monitor_error: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed",
        description="When a monitor raises while scoring. fail_closed: refuse the generation "
        "(outcome refused, the error in the log); fail_open: log the error, disable "
        "that monitor for the rest of the generation and continue.",
    )
    # Sections left out default to {} validated like file input, so their paths resolve too.
    backtrack: BacktrackSpec = Field(
        default_factory=dict, validate_default=True, description="Rollback and resampling."
    )
    stream: StreamSpec = Field(
        default_factory=dict, validate_default=True, description="Streaming."
    )
    log: LogSpec = Field(
        default_factory=dict, validate_default=True, description="Flagged-generation log."
    )
    defaults: RequestDefaults = Field(
        default_factory=dict, validate_default=True, description="Sampling defaults for requests."
    )
    access: AccessSpec | None = Field(
        None,
        description="API keys bound to this policy; null: any global key "
        "(or anyone, when the server has no keys).",
    )
    deliberation: DeliberationSpec = Field(
        default_factory=dict,
        validate_default=True,
        description="Deliberative reasoning over a written spec.",
    )

    _content_hash: str | None = PrivateAttr(None)
    _source_path: Path | None = PrivateAttr(None)

    @field_validator("monitors")
    @classmethod
    def _unique_names(cls, monitors: list[ProbeMonitorSpec | ResetTokenMonitorSpec]) -> list:
        seen: dict[str, int] = {}
        for i, m in enumerate(monitors):
            if m.name in seen:
                # loc_suffix lets the loader point at the duplicate entry, not the whole list.
                raise PydanticCustomError(
                    "duplicate_name",
                    "duplicate monitor name '{name}' (also monitors[{first}])",
                    {"name": m.name, "first": seen[m.name], "loc_suffix": (i, "name")},
                )
            seen[m.name] = i
        return monitors

    @model_validator(mode="after")
    def _native_reset_name_free(self) -> Policy:
        if self.model.native_reset_token is None:
            return self
        for i, m in enumerate(self.monitors):
            if m.name == NATIVE_RESET and m.kind != "reset_token":
                raise PydanticCustomError(
                    CROSS_FIELD,
                    "monitor name '{name}' is kept for the model's own reset token "
                    "(model.native_reset_token): rename the monitor, or set "
                    "model.native_reset_token: null",
                    {"name": NATIVE_RESET, "loc_suffix": ("monitors", i, "name")},
                )
        return self

    @model_validator(mode="after")
    def _check_deliberation(self) -> Policy:
        # The same checks run on raw data when fields fail (guard.policy.cross), so one pass reports both.
        for loc, message in cross_field_errors(self.model_dump()):
            raise PydanticCustomError(CROSS_FIELD, message, {"loc_suffix": loc})
        return self

    @model_validator(mode="after")
    def _fill_served_name(self) -> Policy:
        if self.model.served_name is None:
            self.model.served_name = self.name
        return self

    @property
    def content_hash(self) -> str:
        """sha256 hex of the policy file's bytes (of the canonical JSON when built in Python)."""
        if self._content_hash is None:
            return hashlib.sha256(self.model_dump_json().encode()).hexdigest()
        return self._content_hash

    @property
    def source_path(self) -> Path | None:
        """The file the policy was loaded from, if any."""
        return self._source_path

    def monitor(self, name: str) -> ProbeMonitorSpec | ResetTokenMonitorSpec | SaeMonitorSpec:
        """The monitor called ``name`` (KeyError if none)."""
        for m in self.monitors:
            if m.name == name:
                return m
        raise KeyError(name)
