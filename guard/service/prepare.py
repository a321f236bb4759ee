"""Request preparation: validate and tokenise one generation request before any response is sent.

:func:`prepare` raises :class:`~guard.errors.NotFoundError` (unknown model, ``param="model"``),
:class:`~guard.errors.ContextLengthError` or :class:`~guard.errors.InvalidRequestError`, each
naming the request field at fault, so that a stream can still answer with a proper HTTP status.
It is the one place a request is checked against the model's context window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guard.controller.deliberation import system_prompt
from guard.errors import ContextLengthError, InvalidRequestError
from guard.neutralise import neutralise_text
from guard.sampling import SamplingParams, check_token_ids
from guard.service.registry import PolicyRegistry, Served


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as the server received it; ``None`` means "the policy's default"."""

    model: str
    request_id: str
    messages: list[dict[str, Any]] | None = None
    """Chat messages (``/v1/chat/completions``); exactly one of messages/prompt is set."""
    prompt: str | list[int] | None = None
    """Raw prompt text or token ids (``/v1/completions``); no chat template is applied."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_token_ids: frozenset[int] = frozenset()
    sampling: dict[str, Any] = field(default_factory=dict)
    """More :class:`~guard.sampling.SamplingParams` fields (vLLM's sampling extensions)."""
    allowed_models: frozenset[str] | None = None
    """The policies the caller's key may use; ``None``: every policy."""
    group: str | None = None
    """The client request this generation belongs to (its choices and prompts share one turn of the
    engine worker, so one request's fan-out cannot starve another request); ``None``: its own."""
    client_retracts: bool = True
    """The consumer applies :class:`~guard.controller.events.Reset` events (a library caller, a
    reset-aware stream, an answer sent whole at the end). ``False`` (the server sets it for every
    stream whose client did not opt in): only settled text is released and released text is never
    retracted (:mod:`guard.controller.release`)."""

    @property
    def prompt_param(self) -> str:
        """The request field holding the prompt: ``messages`` (chat) or ``prompt`` (completions)."""
        return "messages" if self.messages is not None else "prompt"


@dataclass
class PreparedGeneration:
    """A validated, tokenised request, ready to run (:meth:`guard.service.GuardService.stream`)."""

    request: GenerationRequest
    served: Served
    prompt_ids: list[int]
    params: SamplingParams

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def model(self) -> str:
        return self.served.policy.name

    @property
    def request_id(self) -> str:
        return self.request.request_id


NORMALIZATION_SLACK = 4
"""How many input bytes one token may cover beyond its own spelling (a normalizer may contract
"ﬁ", 3 bytes, to "fi"): a generous factor keeps :func:`_refuse_certainly_too_long` a lower bound."""


def prepare(registry: PolicyRegistry, req: GenerationRequest) -> PreparedGeneration:
    """Validate and tokenise ``req``; raises before anything is sent to the client."""
    served = registry.resolve(req.model, req.allowed_models)
    info = served.engine.info
    _refuse_certainly_too_long(req, served.engine.tokenizer, info.context_length)
    prompt_ids = _prompt_ids(served, req)
    room = check_context(info.context_length, len(prompt_ids), req.max_tokens, req.prompt_param)
    d = served.policy.defaults
    params = SamplingParams(
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_p=d.top_p if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        max_tokens=req.max_tokens if req.max_tokens is not None else min(d.max_tokens, room),
        stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids),
        logit_bias=dict(req.logit_bias),
        banned_token_ids=frozenset(req.banned_token_ids),
        **req.sampling,
    )
    check_token_ids(params, info.vocab_size)
    return PreparedGeneration(req, served, prompt_ids, params)


def check_context(
    context_length: int, prompt_tokens: int, max_tokens: int | None, param: str
) -> int:
    """The room left for output; :class:`ContextLengthError` (naming ``param`` for the prompt, or
    ``max_tokens``) when the prompt, or the prompt plus ``max_tokens``, exceeds the context window."""
    room = context_length - prompt_tokens
    if room < 1:
        raise ContextLengthError(
            f"This model's maximum context length is {context_length} tokens; "
            f"the prompt has {prompt_tokens} tokens.",
            param=param,
        )
    if max_tokens is not None and max_tokens > room:
        raise ContextLengthError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return room


def _prompt_ids(served: Served, req: GenerationRequest) -> list[int]:
    """The prompt's token ids (chat messages through the template, text, or ids checked)."""
    info = served.engine.info
    tok = served.engine.tokenizer
    if req.messages is not None:
        prompt_ids = tok.encode_chat(_chat_messages(served, req.messages))
    elif isinstance(req.prompt, str):
        prompt_ids = tok.encode(req.prompt)
    elif req.prompt is not None:
        prompt_ids = [int(t) for t in req.prompt]
        if any(not 0 <= t < info.vocab_size for t in prompt_ids):
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {info.vocab_size})", param="prompt"
            )
    else:
        raise InvalidRequestError("either messages or prompt is required", param="messages")
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty", param=req.prompt_param)
    return prompt_ids


def _refuse_certainly_too_long(req: GenerationRequest, tok: Any, context_length: int) -> None:
    """ContextLengthError for a text prompt that cannot fit however it tokenises, without tokenising
    it (a huge prompt would hold the tokenizer, and the GIL, for seconds)."""
    per_token = getattr(tok, "max_token_bytes", None)
    if not per_token:
        return
    if req.messages is not None:
        texts = [m["content"] for m in req.messages if isinstance(m.get("content"), str)]
    elif isinstance(req.prompt, str):
        texts = [req.prompt]
    else:
        return
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    at_least = size // (per_token * NORMALIZATION_SLACK)
    if at_least > context_length:
        raise ContextLengthError(
            f"This model's maximum context length is {context_length} tokens; the prompt has "
            f"{size} bytes of text, at least {at_least} tokens.",
            param=req.prompt_param,
        )


def _chat_messages(served: Served, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages the model sees: reasoning tags in client content broken (tags that are special
    tokens are neutralised by the tokenizer anyway), and the spec as a first system message for
    ``placement: system``."""
    d = served.config.deliberation
    if d is None:
        return messages
    tok = served.engine.tokenizer
    tags = tuple(t for t in (d.open_tag, d.close_tag) if tok.token_id(t) is None)
    out = [
        {**m, "content": neutralise_text(m["content"], tags)}
        if isinstance(m.get("content"), str)
        else m
        for m in messages
    ]
    if d.placement == "system" and d.mode == "always":
        out.insert(0, {"role": "system", "content": system_prompt(d.instruction, d.spec)})
    return out
