"""Request and response models of the OpenAI-compatible API, ordered like the OpenAI reference.

Requests mirror OpenAI's: unknown top-level fields are ignored (``extra="ignore"``), parameters
guard cannot honour (penalties, logprobs, tools, ``echo``, ...) are rejected with a 400 naming the
parameter rather than silently dropped. Guard's own request fields sit in one fenced block per
request (reachable from the ``openai`` client through ``extra_body``); they are strictly typed
(no string-to-number coercion).

Responses add one extension field, ``guard``, on each choice (a choice is one guarded
generation): :class:`GuardInfo` on non-streaming choices and on the last chunk of a streamed
choice, :class:`GuardReset` wrapped as ``{"reset": {...}}`` on a reset chunk. Response fields that
are ``None`` serialise as ``null`` the way OpenAI's do, except the extension fields and a chunk's
``usage``, which are left out when unset.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from typing_extensions import TypeIs

from guard.controller.events import FinishReason, Outcome

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 8
MAX_STOP = 4
MAX_PROMPTS = 16

Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[StrictInt, Field(ge=0)]
StopSequence = Annotated[str, Field(min_length=1)]


# --------------------------------------------------------------------------------------------
# Shared request parts
# --------------------------------------------------------------------------------------------


def _is_token_ids(value: object) -> TypeIs[list[int]]:
    """A non-empty list of token ids (one prompt), not a batch of prompts."""
    return isinstance(value, list) and bool(value) and all(isinstance(x, int) for x in value)


class OpenAIRequest(BaseModel):
    """Base of request models: unknown fields are ignored, as OpenAI does; text that cannot be
    encoded as UTF-8 (a lone surrogate such as ``"\\ud800"``) is a 400 naming its field."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        where = _unencodable(value)
        if where is not None:
            raise ValueError(
                f"text{where} contains a lone surrogate or other character that cannot be "
                "encoded as UTF-8"
            )
        return value


def _unencodable(value: Any, where: str = "") -> str | None:
    """Where in ``value`` (``""``, ``"[2]"``, ...) a string cannot be encoded as UTF-8; ``None`` if nowhere.
    Nested request models check their own fields."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, (list, tuple)):
        return next(
            (w for i, v in enumerate(value) if (w := _unencodable(v, f"{where}[{i}]")) is not None),
            None,
        )
    if isinstance(value, dict):
        return next(
            (
                w
                for k, v in value.items()
                for w in (_unencodable(k, f"{where} key"), _unencodable(v, f"{where}[{k!r}]"))
                if w is not None
            ),
            None,
        )
    return None


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = Field(
        None, description="Send a last chunk with the usage and no choices."
    )

    # --8<-- [start:guard-stream-options]
    # Guard's vendor stream option (openai client: extra_body={"stream_options": {...}}); see README "Streams".
    guard_resets: StrictBool | None = Field(
        None,
        description="The client applies guard reset chunks: text is released after the fixed hold-back "
        "and may later be retracted. Without it (or the X-Guard-Resets header) text is released "
        "only once settled and is never retracted.",
    )
    # --8<-- [end:guard-stream-options]


def _reject_nonzero_penalty(value: float | None, name: str) -> float | None:
    if value:
        raise ValueError(f"{name} is not supported by guard; send 0 or leave it out")
    return value


def _check_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    for key in bias or {}:
        if not key.isdigit():
            raise ValueError(
                f"logit_bias keys must be token ids (non-negative integers), got {key!r}"
            )
    return bias


VLLM_DEFAULTS: dict[str, Any] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": None,
    "truncation_side": None,
    "prompt_logprobs": None,
    "logprob_token_ids": None,
    "bad_words": [],
    "structured_outputs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "watermarking": False,
    "priority": 0,
    "request_id": None,
    "session_id": None,
    "cache_salt": None,
    "vllm_xargs": None,
    "kv_transfer_params": None,
    "return_token_ids": False,
    "return_tokens_as_token_ids": False,
    "return_token_offsets": False,
    "thinking_token_budget": None,
    "repetition_detection": None,
    "stream_interval": None,
}
"""vLLM 0.32's request extensions (``ChatCompletionRequest``/``CompletionRequest``) that guard does
not implement -> vLLM's default, the only value accepted. (Its sampling extensions that guard does
implement are typed fields of :class:`SamplingFields`.)"""


CHAT_VLLM_DEFAULTS: dict[str, Any] = {
    "echo": False,
    "add_generation_prompt": True,
    "continue_final_message": False,
    "add_special_tokens": False,
    "documents": None,
    "chat_template": None,
    "chat_template_kwargs": None,
    "mm_processor_kwargs": None,
    "media_io_kwargs": None,
}
"""The same for vLLM's chat-only extensions (chat template handling)."""


def _vllm_default_only(value: Any, name: str, defaults: dict[str, Any]) -> Any:
    if value is not None and value != defaults[name]:
        raise ValueError(
            f"{name} (a vLLM extension) is not supported by guard; leave it out or send vLLM's "
            f"default ({json.dumps(defaults[name])})"
        )
    return value


class VLLMSamplingFields(OpenAIRequest):
    """vLLM's request extensions (openai client: ``extra_body={...}``), shared by every endpoint.

    Its sampling extensions are honoured on both engines as vLLM defines them; every other vLLM
    extension is refused (a 400 naming the field) unless it holds vLLM's default: none is ignored."""

    # --8<-- [start:vllm-sampling-params]
    stop_token_ids: list[TokenId] | None = Field(
        None, description="Token ids that end the generation."
    )
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Drop tokens less likely than min_p times the "
        "most likely one (after temperature).",
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        description="Divide the positive (multiply the "
        "negative) logits of every token already in the sequence, prompt "
        "included; 1 disables.",
    )
    ignore_eos: StrictBool | None = Field(
        None,
        description="Keep generating after end-of-sequence tokens "
        "(stop_token_ids still end the answer).",
    )
    min_tokens: StrictInt | None = Field(
        None,
        ge=0,
        description="End-of-sequence and stop_token_ids are not "
        "sampled before this many answer tokens.",
    )
    allowed_token_ids: list[TokenId] | None = Field(
        None, min_length=1, description="Only these token ids may be sampled."
    )
    # --8<-- [end:vllm-sampling-params]
    # Not implemented by guard: accepted only with vLLM's default value (VLLM_DEFAULTS).
    use_beam_search: Any = None
    length_penalty: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    truncate_prompt_tokens: Any = None
    truncation_side: Any = None
    prompt_logprobs: Any = None
    logprob_token_ids: Any = None
    bad_words: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    watermarking: Any = None
    priority: Any = None
    request_id: Any = None
    session_id: Any = None
    cache_salt: Any = None
    vllm_xargs: Any = None
    kv_transfer_params: Any = None
    return_token_ids: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_offsets: Any = None
    thinking_token_budget: Any = None
    repetition_detection: Any = None
    stream_interval: Any = None

    @field_validator(*VLLM_DEFAULTS, mode="after")
    @classmethod
    def _vllm_default_only(cls, value: Any, info: ValidationInfo) -> Any:
        return _vllm_default_only(value, str(info.field_name), VLLM_DEFAULTS)

    def sampling_extensions(self) -> dict[str, Any]:
        """The vLLM sampling extensions the request set, as ``guard.sampling.SamplingParams`` fields."""
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("min_p", "repetition_penalty", "ignore_eos", "min_tokens")
            if getattr(self, k) is not None
        }
        if self.allowed_token_ids is not None:
            out["allowed_token_ids"] = frozenset(self.allowed_token_ids)
        return out


class SamplingFields(VLLMSamplingFields):
    """Sampling parameters shared by chat and text completions (OpenAI's, then guard's)."""

    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Unsupported: only 0 is accepted."
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit."
    )
    n: int = Field(1, ge=1, le=MAX_N, description="How many choices to generate.")
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Unsupported: only 0 is accepted."
    )
    seed: Seed | None = Field(None, description="Seed; choice i of n uses seed + i.")
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP)] | None = Field(
        None, description="Up to 4 sequences where generation stops (not included in the output)."
    )
    stream: bool = Field(False, description="Send the answer as server-sent events.")
    stream_options: StreamOptions | None = Field(
        None, description="Only allowed with stream: true."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    user: str | None = Field(None, description="End-user id (accepted, not used).")

    # --8<-- [start:guard-sampling-params]
    # Guard's vendor parameters (openai client: extra_body={...}). Strictly typed.
    top_k: StrictInt | None = Field(
        None,
        ge=-1,
        description="Keep only the k most likely tokens; 0 or -1 (vLLM's spelling) disables.",
    )
    banned_token_ids: list[TokenId] | None = Field(
        None, description="Token ids that are never sampled."
    )
    # --8<-- [end:guard-sampling-params]

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, value: float | None, info: ValidationInfo) -> float | None:
        return _reject_nonzero_penalty(value, str(info.field_name))

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        return _check_logit_bias(bias)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def guard_resets(self) -> bool:
        """The client opted in to reset chunks through ``stream_options.guard_resets``."""
        return bool(self.stream_options and self.stream_options.guard_resets)


# --------------------------------------------------------------------------------------------
# /v1/chat/completions request
# --------------------------------------------------------------------------------------------


class TextContentPart(OpenAIRequest):
    type: str = Field(description="Only 'text' is supported.")
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content part type {value!r} is not supported; only 'text' parts are")
        return value


class ChatMessage(OpenAIRequest):
    role: Literal["developer", "system", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: bool | None = Field(None, description="Unsupported: only false is accepted.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Most output tokens (wins over max_tokens)."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Deprecated alias of max_completion_tokens."
    )
    response_format: dict[str, Any] | None = Field(
        None, description="Only {'type': 'text'} is supported."
    )
    tool_choice: Any = Field(None, description="Unsupported.")
    tools: list[Any] | None = Field(None, description="Unsupported.")
    top_logprobs: int | None = Field(None, description="Unsupported.")

    # vLLM's chat extensions guard does not implement: accepted only with vLLM's default value.
    echo: Any = None
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    add_special_tokens: Any = None
    documents: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    mm_processor_kwargs: Any = None
    media_io_kwargs: Any = None

    @field_validator(*CHAT_VLLM_DEFAULTS, mode="after")
    @classmethod
    def _chat_vllm_default_only(cls, value: Any, info: ValidationInfo) -> Any:
        return _vllm_default_only(value, str(info.field_name), CHAT_VLLM_DEFAULTS)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs is not supported by guard; send false or leave it out")
        return value

    @field_validator("top_logprobs", "tools", "tool_choice")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != []:
            raise ValueError(f"{info.field_name} is not supported by guard")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported by guard")
        return value

    def output_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


# --------------------------------------------------------------------------------------------
# /v1/completions request
# --------------------------------------------------------------------------------------------

Prompt = str | Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``; a list of prompts is a batch (choice index = prompt * n + i)."""

    model: str
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
    best_of: int | None = Field(None, ge=1, description="Unsupported beyond best_of == n.")
    echo: bool | None = Field(None, description="Unsupported: only false is accepted.")
    logprobs: int | None = Field(None, description="Unsupported.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most output tokens; default: the policy's."
    )
    suffix: str | None = Field(None, description="Unsupported.")
    # vLLM's completion extensions guard does not implement: accepted only with vLLM's default value.
    add_special_tokens: Any = None
    prompt_embeds: Any = None
    response_format: Any = None

    @field_validator("add_special_tokens", "prompt_embeds", "response_format", mode="after")
    @classmethod
    def _completion_vllm_default_only(cls, value: Any, info: ValidationInfo) -> Any:
        return _vllm_default_only(
            value,
            str(info.field_name),
            {"add_special_tokens": True, "prompt_embeds": None, "response_format": None},
        )

    @field_validator("echo", "suffix", "logprobs")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported by guard")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of is not supported by guard (only best_of == n)")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a single string or token-id list is a batch of one."""
        p = self.prompt
        if isinstance(p, str) or _is_token_ids(p):
            return [p]
        return list(p)


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


class OmitUnset(BaseModel):
    """Serialises ``None`` as ``null`` except for the fields named in ``_omit_if_none``."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("guard",)

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self._omit_if_none:
            if data.get(name, 0) is None:
                del data[name]
        return data


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens of the final answers (discarded and resampled tokens are not counted)."""
    total_tokens: int = 0


class GuardInfo(OmitUnset):
    """Extension: what guard did to one choice."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("reasoning_tokens",)

    outcome: Outcome
    """clean: no monitor fired; recovered: fired, and a resample passed; refused: retries exhausted."""
    resets: int
    """How many times a monitor fired and the generation was cut back."""
    log_id: str | None = None
    """Id of the flagged-generation log record, when one was written."""
    monitors_fired: list[str] = Field(default_factory=list)
    generated_tokens: int = 0
    """Every token sampled for this choice, discarded and resampled ones included (the real cost)."""
    reasoning_tokens: int | None = None
    """Tokens of the hidden reasoning section, forced spec included (only when the answer deliberated;
    the reasoning text is never sent)."""


class GuardReset(BaseModel):
    """Extension: retract the last ``retract_chars`` characters of this choice already sent."""

    retract_chars: int
    retract_tokens: int
    monitor: str
    retry: int
    marker: str | None = None
    """Text the policy asks to show where text was retracted, if any."""


class ResetNotice(BaseModel):
    """Extension on a reset chunk's choice: ``{"reset": {...}}``."""

    reset: GuardReset


class GuardCut(BaseModel):
    """Extension: the answer was cut; this chunk's text is the policy's refusal, not model output."""

    kept_chars: int
    """Characters of this choice sent before the cut; they stay (nothing is retracted)."""
    monitor: str
    """The monitor whose firing would have retracted text already sent."""


class CutNotice(BaseModel):
    """Extension on a cut chunk's choice (only for clients that did not opt in to resets): ``{"cut": {...}}``."""

    cut: GuardCut


def _now() -> int:
    return int(time.time())


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChoice(OmitUnset):
    index: int
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: FinishReason
    guard: GuardInfo | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(OmitUnset):
    _omit_if_none: ClassVar[tuple[str, ...]] = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(OmitUnset):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None
    guard: ResetNotice | CutNotice | GuardInfo | None = None


class ChatCompletionChunk(OmitUnset):
    _omit_if_none: ClassVar[tuple[str, ...]] = ("usage",)
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionChoice(OmitUnset):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None
    guard: ResetNotice | CutNotice | GuardInfo | None = None


class Completion(OmitUnset):
    """A text completion; also each streamed chunk (OpenAI uses the same object for both)."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("usage",)
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "guard"
    # Extension: the policy serving this alias and the underlying model's name.
    policy: str = ""
    root: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
