"""Request, response and stream-event models of ``POST /v1/responses`` (OpenAI Responses API).

Guard serves the text subset of the Responses API: ``input`` as a string or a list of messages
(text content only), ``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``,
``stream`` and ``metadata``; nothing is stored (``store`` may only be false), so features that
need stored state or tools (``previous_response_id``, ``conversation``, ``background``, ``tools``,
``prompt``, ...) are rejected with a 400 naming the parameter. Guard's vendor fields sit in one
fenced block, as in :mod:`server.protocol`.

Responses mirror OpenAI's ``Response`` object with one extension field, ``guard`` (a
:class:`~server.protocol.GuardInfo`), on the response. A stream is the documented event sequence
(``response.created`` ... ``response.completed`` or ``response.incomplete``), each event with a
``sequence_number``; guard adds ``response.guard.reset`` events for clients that opted in to
resets, and a cut answer ends with a ``refusal`` content part (:mod:`server.responses_serving`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, ValidationInfo, field_validator

from server.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_STOP,
    GuardInfo,
    GuardReset,
    OpenAIRequest,
    StopSequence,
    VLLMSamplingFields,
    _reject_nonzero_penalty,
)

# --------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------


class InputTextPart(OpenAIRequest):
    type: str = Field(description="'input_text' (or 'output_text' in an assistant message).")
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value not in ("input_text", "output_text", "text"):
            raise ValueError(
                f"content part type {value!r} is not supported; only 'input_text' parts are"
            )
        return value


class InputMessage(OpenAIRequest):
    """An input item: a message (other item types, such as function call outputs, are unsupported)."""

    type: str = Field("message", description="Only 'message' items are supported.")
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputTextPart]

    @field_validator("type")
    @classmethod
    def _message_only(cls, value: str) -> str:
        if value != "message":
            raise ValueError(
                f"input item type {value!r} is not supported by guard; only 'message' items are"
            )
        return value

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ResponsesStreamOptions(OpenAIRequest):
    include_obfuscation: bool | None = Field(
        None, description="Accepted; guard never adds obfuscation."
    )

    # --8<-- [start:guard-responses-stream-options]
    guard_resets: StrictBool | None = Field(
        None, description="The client applies response.guard.reset events (see README, 'Streams')."
    )
    # --8<-- [end:guard-responses-stream-options]


_UNSUPPORTED = (
    "background",
    "conversation",
    "previous_response_id",
    "prompt",
    "include",
    "tools",
    "reasoning",
    "top_logprobs",
    "max_tool_calls",
    "context_management",
)


class ResponsesRequest(VLLMSamplingFields):
    """``POST /v1/responses`` (with vLLM's sampling extensions, as vLLM's own ``/v1/responses`` has)."""

    model: str
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(
        None, ge=1, description="Most output tokens; default: the policy's."
    )
    metadata: dict[str, str] | None = Field(None, description="Echoed on the response.")
    store: bool | None = Field(
        None, description="Only false (or unset): guard does not store responses."
    )
    stream: bool = Field(False, description="Send the response as server-sent events.")
    stream_options: ResponsesStreamOptions | None = Field(
        None, description="Only allowed with stream: true."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: dict[str, Any] | None = Field(
        None, description="Only {'format': {'type': 'text'}} is supported."
    )
    tool_choice: Any = Field(None, description="Only 'none' or 'auto' with no tools.")
    truncation: Literal["disabled"] | None = Field(None, description="Only 'disabled'.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")
    user: str | None = Field(None, description="Accepted, not used.")
    safety_identifier: str | None = Field(None, description="Accepted, not used.")
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Unsupported: only 0 is accepted."
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Unsupported: only 0 is accepted."
    )
    # Unsupported: any value other than null / empty is a 400 naming the field.
    background: Any = None
    conversation: Any = None
    previous_response_id: Any = None
    prompt: Any = None
    include: Any = None
    tools: Any = None
    reasoning: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    context_management: Any = None

    # --8<-- [start:guard-responses-params]
    # Guard's vendor parameters (openai client: extra_body={...}). Strictly typed.
    seed: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] | None = Field(
        None, description="Sampling seed."
    )
    top_k: StrictInt | None = Field(
        None,
        ge=-1,
        description="Keep only the k most likely tokens; 0 or -1 (vLLM's spelling) disables.",
    )
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP)] | None = Field(
        None, description="Up to 4 sequences where generation stops (not included in the output)."
    )
    # --8<-- [end:guard-responses-params]

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False, [], {}):
            raise ValueError(
                f"{info.field_name} is not supported by guard (text-only, nothing stored)"
            )
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, value: float | None, info: ValidationInfo) -> float | None:
        return _reject_nonzero_penalty(value, str(info.field_name))

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("guard does not store responses; send store: false or leave it out")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported by guard (no tools)")
        return value

    @field_validator("text")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        fmt = (value or {}).get("format") or {"type": "text"}
        if not isinstance(fmt, dict) or fmt.get("type", "text") != "text":
            raise ValueError("only text: {'format': {'type': 'text'}} is supported by guard")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: ResponsesStreamOptions | None, info: ValidationInfo
    ) -> ResponsesStreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def messages(self) -> list[dict[str, str]]:
        """The chat messages the model sees: ``instructions`` as a system message, then the input."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        roles = {"developer": "system"}
        return [
            *out,
            *({"role": roles.get(m.role, m.role), "content": m.text()} for m in self.input),
        ]

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def guard_resets(self) -> bool:
        return bool(self.stream_options and self.stream_options.guard_resets)


# --------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputRefusal(BaseModel):
    """The policy's refusal after a cut (a stream whose rollback would have reached shown text)."""

    type: Literal["refusal"] = "refusal"
    refusal: str


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText | OutputRefusal]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    """OpenAI's ``Response``; ``guard`` is the extension (absent until the response is complete)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    guard: GuardInfo | None = None


# --------------------------------------------------------------------------------------------
# Stream events (each also carries ``sequence_number``, set by the serving layer)
# --------------------------------------------------------------------------------------------


class ResponseEvent(BaseModel):
    """Base of stream events; ``type`` is the SSE ``event:`` name too."""

    type: str
    sequence_number: int = 0


class ResponseLifecycleEvent(ResponseEvent):
    """``response.created``, ``response.in_progress``, ``response.completed``, ``response.incomplete``."""

    response: ResponseObject


class OutputItemEvent(ResponseEvent):
    """``response.output_item.added`` / ``.done``."""

    output_index: int = 0
    item: OutputMessage


class ContentPartEvent(ResponseEvent):
    """``response.content_part.added`` / ``.done``."""

    item_id: str
    output_index: int = 0
    content_index: int
    part: OutputText | OutputRefusal


class TextDeltaEvent(ResponseEvent):
    """``response.output_text.delta``."""

    item_id: str
    output_index: int = 0
    content_index: int = 0
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(ResponseEvent):
    """``response.output_text.done``: the whole final text of the part."""

    item_id: str
    output_index: int = 0
    content_index: int = 0
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class RefusalDeltaEvent(ResponseEvent):
    """``response.refusal.delta``."""

    item_id: str
    output_index: int = 0
    content_index: int
    delta: str


class RefusalDoneEvent(ResponseEvent):
    """``response.refusal.done``."""

    item_id: str
    output_index: int = 0
    content_index: int
    refusal: str


class GuardResetEvent(ResponseEvent):
    """Extension ``response.guard.reset`` (only for clients that opted in): drop the last
    ``reset.retract_chars`` characters of the output text part."""

    type: Literal["response.guard.reset"] = "response.guard.reset"
    item_id: str
    output_index: int = 0
    content_index: int = 0
    reset: GuardReset


class ErrorEvent(ResponseEvent):
    """``error``: the stream failed after it started (the last event)."""

    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None
