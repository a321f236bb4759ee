"""``/openapi.json``: what every endpoint really answers, streams and errors included.

FastAPI documents a ``422`` with its own validation-error body on every route with parameters;
guard answers bad input with OpenAI error JSON and ``400`` (:mod:`server.errors`), so the schema
says that instead, and names the other statuses each endpoint can return. Generation endpoints
document both bodies they send: the JSON object, and for ``stream: true`` a ``text/event-stream``
whose events are the chunk (or Responses event) schemas listed under ``components``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.responses_protocol import (
    ContentPartEvent,
    ErrorEvent,
    GuardResetEvent,
    OutputItemEvent,
    RefusalDeltaEvent,
    RefusalDoneEvent,
    ResponseLifecycleEvent,
    ResponseObject,
    TextDeltaEvent,
    TextDoneEvent,
)

REF = "#/components/schemas/{model}"

ERRORS: dict[str, str] = {
    "400": "Invalid request: a malformed body, an out-of-range or unsupported parameter (error.param names it), "
    "a prompt too long for the context.",
    "401": "Missing or wrong API key (when keys are configured).",
    "404": "Unknown model, or one the API key may not use.",
    "413": "The request body is larger than the server accepts.",
    "500": "A bug on the server (logged with its traceback); the body says nothing about internals.",
    "503": "The engine's queue is full; retry later.",
}

RESPONSE_EVENTS = (
    ResponseLifecycleEvent,
    OutputItemEvent,
    ContentPartEvent,
    TextDeltaEvent,
    TextDoneEvent,
    RefusalDeltaEvent,
    RefusalDoneEvent,
    GuardResetEvent,
    ErrorEvent,
)

GENERATION: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "/v1/chat/completions": (ChatCompletion, {"$ref": REF.format(model="ChatCompletionChunk")}),
    "/v1/completions": (Completion, {"$ref": REF.format(model="Completion")}),
    "/v1/responses": (
        ResponseObject,
        {"oneOf": [{"$ref": REF.format(model=m.__name__)} for m in RESPONSE_EVENTS]},
    ),
}
"""POST path -> (JSON body, schema of one ``data:`` event of its stream)."""

PLAIN: dict[tuple[str, str], type[BaseModel]] = {
    ("get", "/v1/models"): ModelList,
    ("get", "/v1/models/{model}"): ModelCard,
}

STREAM_NOTE = (
    "With stream: true, server-sent events, each `data:` line one event of the schema shown; chat and "
    "text completions end with `data: [DONE]`. A failure after the stream started is one error event "
    "(then `[DONE]` for chat and text completions). Guard's reset and cut chunks: README, 'Streams'."
)


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the corrected schema (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            document(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(schema: dict[str, Any]) -> None:
    """Rewrite ``schema`` in place: real error statuses, response and stream schemas."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    models: list[type[BaseModel]] = [
        ErrorResponse,
        ChatCompletion,
        ChatCompletionChunk,
        Completion,
        ModelList,
        ModelCard,
        ResponseObject,
        *RESPONSE_EVENTS,
    ]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    components.update(defs.get("$defs", {}))
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            had_validation = responses.pop("422", None) is not None
            if path in GENERATION and method == "post":
                body, event = GENERATION[path]
                responses["200"] = {
                    "description": "The response; " + STREAM_NOTE,
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model=body.__name__)}},
                        "text/event-stream": {"schema": event},
                    },
                }
                codes: tuple[str, ...] = ("400", "401", "404", "413", "500", "503")
            elif (method, path) in PLAIN:
                responses["200"] = {
                    "description": "Successful Response",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": REF.format(model=PLAIN[(method, path)].__name__)}
                        }
                    },
                }
                codes = ("401", "404") if "{" in path else ("401",)
            else:
                codes = ("400",) if had_validation else ()
            for code in codes:
                responses.setdefault(
                    code,
                    {
                        "description": ERRORS[code],
                        "content": {
                            "application/json": {
                                "schema": {"$ref": REF.format(model="ErrorResponse")}
                            }
                        },
                    },
                )
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in components and unused not in str(schema["paths"]):
            del components[unused]
