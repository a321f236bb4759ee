"""The one place exceptions become OpenAI error JSON: ``{"error": {message, type, param, code}}``.

:func:`error_response` decides status and body for every exception the server can see; the
exception handlers registered by :func:`install_error_handlers` and the SSE error event of a
failed stream (:func:`sse_error`) both go through it. Bad input always maps to a 4xx: a 500 means
a bug, is logged with its traceback, and tells the client nothing about internals.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from guard.errors import GuardError, UnavailableError
from server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

_FIELD = re.compile(r"^(\d+|[a-z_][a-z0-9_]*)$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
"""pydantic names union members in an error's loc; these (and anything not field-like) are not fields."""


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its generations were cancelled."""


def error_response(exc: BaseException) -> tuple[int, ErrorResponse]:
    """HTTP status and OpenAI error body for ``exc``."""
    if isinstance(exc, GuardError):
        info = ErrorInfo(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
        if exc.status_code >= 500:
            log.error("request failed: %s: %s", type(exc).__name__, exc.message)
        return exc.status_code, ErrorResponse(error=info)
    if isinstance(exc, RequestValidationError):
        return 400, ErrorResponse(error=_validation_info(exc.errors()))
    if isinstance(exc, ClientDisconnected):
        # nginx's "client closed request": nobody reads it, but it keeps such requests out of the 5xx count.
        return 499, ErrorResponse(
            error=ErrorInfo(message="client disconnected", type="client_disconnected")
        )
    if isinstance(exc, HTTPException):
        return exc.status_code, ErrorResponse(error=_http_info(exc))
    log.error("unexpected error", exc_info=exc)
    info = ErrorInfo(
        message="The server had an error while processing your request.", type="internal_error"
    )
    return 500, ErrorResponse(error=info)


RETRY_AFTER_S = 1
"""``Retry-After`` of a 503 from a draining replica: a load balancer has another one ready."""


def json_error(exc: BaseException) -> JSONResponse:
    status, body = error_response(exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, UnavailableError) else None
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def sse_error(exc: BaseException) -> str:
    """The SSE event a stream sends when it fails after the response has started (then ``[DONE]``)."""
    _, body = error_response(exc)
    return f"data: {json.dumps(body.model_dump(mode='json'))}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise through :func:`error_response`."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return json_error(exc)

    for exc_type in (RequestValidationError, GuardError, HTTPException, Exception):
        app.add_exception_handler(exc_type, handle)


def _validation_info(errors: Sequence[dict[str, Any]]) -> ErrorInfo:
    """The most specific pydantic error, with ``param`` the dotted path of the offending field."""
    if not errors:
        return ErrorInfo(message="Invalid request body.", type="invalid_request_error")
    # Deepest first; at equal depth a constraint (too_long, ...) beats a union member's type mismatch.
    err = max(
        errors,
        key=lambda e: (
            len(_param_path(e.get("loc", ()))),
            not str(e.get("type")).endswith("_type"),
        ),
    )
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return ErrorInfo(
            message=f"We could not parse the JSON body of your request. ({detail})".replace(
                " ()", ""
            ),
            type="invalid_request_error",
        )
    path = _param_path(err.get("loc", ()))
    param = ".".join(path) or None
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if param is None and err.get("type") in ("missing", "model_attributes_type", "dict_type"):
        msg = "The request body must be a JSON object, sent with Content-Type: application/json."
    elif err.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'."
    else:
        msg = f"Invalid value for '{param}': {msg}"
    return ErrorInfo(message=msg, type="invalid_request_error", param=param, code=None)


def _param_path(loc: tuple | list) -> list[str]:
    """``('body', 'messages', 0, 'content', 'str')`` -> ``['messages', '0', 'content']``; query, path
    and header parameters are named without their source (``('query', 'limit')`` -> ``['limit']``)."""
    parts = (
        [str(p) for p in loc[1:]]
        if loc and loc[0] in ("body", "query", "path", "header")
        else [str(p) for p in loc]
    )
    return [p for p in parts if _FIELD.match(p) and p not in _TYPE_TAGS]


def _http_info(exc: HTTPException) -> ErrorInfo:
    if exc.status_code == 404:
        return ErrorInfo(
            message="Unknown request URL. Please check the URL for typos.",
            type="invalid_request_error",
            code="unknown_url",
        )
    if exc.status_code == 405:
        return ErrorInfo(
            message="Method not allowed for this URL.",
            type="invalid_request_error",
            code="method_not_allowed",
        )
    return ErrorInfo(message=str(exc.detail), type="invalid_request_error")
