"""HTTP routes: thin handlers that parse, delegate to :mod:`server.serving`, and respond.

Typed dependencies build on each other: the service comes from the app state (set by the
lifespan, replaceable in tests through ``app.dependency_overrides[get_service]``), the serving
classes from the service, and the caller from the app's global keys plus the keys the service's
policies bind (:mod:`server.auth`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from guard.errors import InvalidRequestError, NotFoundError
from server.auth import Caller, admin_key_in_force, authenticate, bearer_token, check_admin
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses_protocol import ResponsesRequest
from server.responses_serving import ResponsesServing
from server.serving import ChatServing, CompletionServing, GenerationService, model_card, model_list


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


ServiceDep = Annotated[GenerationService, Depends(get_service)]


def get_caller(
    request: Request, service: ServiceDep, authorization: Annotated[str | None, Header()] = None
) -> Caller:
    """The caller; 401 unless the key is global or bound by a policy (no keys anywhere: no check)."""
    return authenticate(authorization, request.app.state.settings.api_keys, service.key_bindings())


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_chat(request: Request, service: ServiceDep) -> ChatServing:
    return ChatServing(service, limits=request.app.state.settings.limits)


def get_completions(request: Request, service: ServiceDep) -> CompletionServing:
    return CompletionServing(service, limits=request.app.state.settings.limits)


def get_responses(request: Request, service: ServiceDep) -> ResponsesServing:
    return ResponsesServing(service, limits=request.app.state.settings.limits)


def get_resets_header(x_guard_resets: Annotated[str | None, Header()] = None) -> bool:
    """``X-Guard-Resets: true``: the client applies reset events (same as ``stream_options.guard_resets``)."""
    if x_guard_resets is None:
        return False
    value = x_guard_resets.strip().lower()
    if value not in ("1", "true", "yes", "0", "false", "no"):
        raise InvalidRequestError("X-Guard-Resets must be true or false", param="X-Guard-Resets")
    return value in ("1", "true", "yes")


ChatDep = Annotated[ChatServing, Depends(get_chat)]
CompletionDep = Annotated[CompletionServing, Depends(get_completions)]
ResponsesDep = Annotated[ResponsesServing, Depends(get_responses)]
ResetsDep = Annotated[bool, Depends(get_resets_header)]

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(get_caller)])


@v1.post("/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    chat: ChatDep,
    caller: CallerDep,
    resets: ResetsDep,
) -> Response:
    """Create a guarded chat completion (OpenAI Chat Completions API)."""
    result = await chat.create(
        body, is_disconnected=request.is_disconnected, caller=caller, resets_header=resets
    )
    return _respond(result)


@v1.post("/completions", response_model=None)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    completions: CompletionDep,
    caller: CallerDep,
    resets: ResetsDep,
) -> Response:
    """Create a guarded text completion (OpenAI Completions API)."""
    result = await completions.create(
        body, is_disconnected=request.is_disconnected, caller=caller, resets_header=resets
    )
    return _respond(result)


@v1.post("/responses", response_model=None)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    responses: ResponsesDep,
    caller: CallerDep,
    resets: ResetsDep,
) -> Response:
    """Create a guarded model response (OpenAI Responses API; text in, text out, not stored)."""
    result = await responses.create(
        body, is_disconnected=request.is_disconnected, caller=caller, resets_header=resets
    )
    return _respond(result)


@v1.get("/models", response_model=None)
async def list_models(service: ServiceDep, caller: CallerDep) -> Response:
    """List the served models the caller may use (one per policy)."""
    return _respond(model_list(service, caller))


@v1.get("/models/{model:path}", response_model=None)
async def retrieve_model(model: str, service: ServiceDep, caller: CallerDep) -> Response:
    """Describe one served model."""
    card = model_card(service, model, caller)
    if card is None:
        raise NotFoundError(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )
    return _respond(card)


@router.get("/health", response_model=None)
async def health() -> Response:
    """Liveness (no API key needed): names no policy, model, file or statistic."""
    return JSONResponse({"status": "ok"})


def admin_view(
    request: Request, service: ServiceDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Operators only: ``Bearer $GUARD_ADMIN_KEY`` when an admin key is set; without one, open only
    while no API key is configured at all (a local, unauthenticated server), else 404."""
    settings = request.app.state.settings
    admin_key = admin_key_in_force(settings.admin_key)
    if admin_key:
        check_admin(bearer_token(authorization), admin_key, "/health/detail")
    elif settings.api_keys or service.key_bindings():
        raise NotFoundError(
            "Unknown request URL. Set GUARD_ADMIN_KEY to read /health/detail on a server "
            "with API keys.",
            code="unknown_url",
        )


@router.get("/health/detail", response_model=None, dependencies=[Depends(admin_view)])
async def health_detail(service: ServiceDep) -> Response:
    """Per policy: hash, monitors, source file, reloads and the last reload error; engine statistics."""
    return JSONResponse(service.health())


router.include_router(v1)


def _respond(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(
        result,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
