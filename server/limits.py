"""Per-request limits: what one request may ask of the server, checked before any work is done.

Two layers, both answering OpenAI error JSON with ``param`` naming what is too big:

- :class:`BodyLimit`, a pure ASGI middleware, refuses a body over ``max_body_bytes`` with 413
  before reading it: at once from ``Content-Length``, or, for a chunked body, as soon as the bytes
  received pass the limit (the rest is never read). A request it passes is replayed to the app
  from the buffered bytes, so nothing downstream reads the socket.
- :func:`check_chat` and :func:`check_completion` bound the parsed request: messages, characters,
  generations (``n`` x prompts). :func:`check_prompt_tokens` bounds each tokenised prompt.

Limits exist so that one request can never hold the event loop, the tokenizer or the engine for
long: everything they allow is tokenised in well under a second, off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard.errors import InvalidRequestError, RequestTooLargeError
from server.errors import error_response


@dataclass(frozen=True)
class RequestLimits:
    """What one request may contain. Every field must be positive."""

    max_body_bytes: int = 2 * 1024 * 1024
    """Request body size (413 beyond it, param ``body``)."""
    max_messages: int = 256
    """Chat messages per request (param ``messages``)."""
    max_chars: int = 200_000
    """Characters of text per request: message contents, or all prompts together (param ``messages`` /
    ``prompt``)."""
    max_prompt_tokens: int = 32_768
    """Tokens of one prompt after templating (and the model's context length still applies)."""
    max_generations: int = 16
    """Generations one request may start: ``n`` times the number of prompts (param ``n``)."""

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_messages",
            "max_chars",
            "max_prompt_tokens",
            "max_generations",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def check_chat(req: Any, limits: RequestLimits) -> None:
    """Bound a :class:`~server.protocol.ChatCompletionRequest`; :class:`InvalidRequestError` names the field."""
    if len(req.messages) > limits.max_messages:
        raise InvalidRequestError(
            f"Too many messages: {len(req.messages)}; this server accepts at most "
            f"{limits.max_messages} per request.",
            param="messages",
            code="too_many_messages",
        )
    total = 0
    for i, m in enumerate(req.messages):
        total += len(m.text())
        if total > limits.max_chars:
            raise InvalidRequestError(
                f"The messages hold more than {limits.max_chars} characters of text; shorten them.",
                param=f"messages.{i}.content",
                code="request_too_large",
            )
    _check_generations(req.n, 1, limits)


def check_completion(req: Any, limits: RequestLimits) -> None:
    """Bound a :class:`~server.protocol.CompletionRequest` (prompts as text or token ids)."""
    prompts = req.prompts()
    total = 0
    for i, p in enumerate(prompts):
        total += len(p)
        if total > limits.max_chars:
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            raise InvalidRequestError(
                f"The prompts hold more than {limits.max_chars} characters (or token ids); "
                "shorten them.",
                param=param,
                code="request_too_large",
            )
    _check_generations(req.n, len(prompts), limits)


def check_responses(req: Any, limits: RequestLimits) -> None:
    """Bound a :class:`~server.responses_protocol.ResponsesRequest` (``instructions`` + ``input``)."""
    messages = req.messages()
    if len(messages) > limits.max_messages:
        raise InvalidRequestError(
            f"Too many input messages: {len(messages)}; this server accepts at most "
            f"{limits.max_messages} per request.",
            param="input",
            code="too_many_messages",
        )
    if sum(len(m["content"]) for m in messages) > limits.max_chars:
        raise InvalidRequestError(
            f"The instructions and input hold more than {limits.max_chars} characters of "
            "text; shorten them.",
            param="input",
            code="request_too_large",
        )


def _check_generations(n: int, prompts: int, limits: RequestLimits) -> None:
    if n * prompts > limits.max_generations:
        raise InvalidRequestError(
            f"This request asks for {n * prompts} generations (n={n} x {prompts} prompt(s)); "
            f"this server runs at most {limits.max_generations} per request.",
            param="n",
            code="too_many_generations",
        )


def check_prompt_tokens(tokens: int, limits: RequestLimits, param: str) -> None:
    if tokens > limits.max_prompt_tokens:
        raise InvalidRequestError(
            f"The prompt has {tokens} tokens; this server accepts at most "
            f"{limits.max_prompt_tokens} per prompt.",
            param=param,
            code="context_length_exceeded",
        )


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, decided before reading it all."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            await self._refuse(send, length)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send, None)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, send: Any, length: int | None) -> None:
        size = f"{length} bytes" if length is not None else f"more than {self.max_bytes} bytes"
        exc = RequestTooLargeError(
            f"The request body is {size}; this server accepts at most {self.max_bytes} "
            "bytes per request.",
            param="body",
        )
        body = error_response(exc)[1].model_dump_json().encode()
        # Connection: close - the unread rest of the body must not be parsed as the next request.
        await send(
            {
                "type": "http.response.start",
                "status": exc.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
