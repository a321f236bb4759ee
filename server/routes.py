"""HTTP routes: thin handlers that parse, delegate to :mod:`server.serving`, and respond.

Typed dependencies build on each other: the service comes from the app state (set by the
lifespan, replaceable in tests through ``app.dependency_overrides[get_service]``), the serving
classes from the service, and the API-key check from the app's settings.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from guard.errors import AuthenticationError, NotFoundError
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import ChatServing, CompletionServing, GenerationService, model_card, model_list


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


ServiceDep = Annotated[GenerationService, Depends(get_service)]


def get_api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> str | None:
    """The caller's API key; 401 unless it is one of the configured keys (no keys: no check, None)."""
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Missing API key: send it as 'Authorization: Bearer YOUR_KEY'.")
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise AuthenticationError("Incorrect API key provided.")
    return token


ApiKeyDep = Annotated[str | None, Depends(get_api_key)]


def get_chat(service: ServiceDep) -> ChatServing:
    return ChatServing(service)


def get_completions(service: ServiceDep) -> CompletionServing:
    return CompletionServing(service)


ChatDep = Annotated[ChatServing, Depends(get_chat)]
CompletionDep = Annotated[CompletionServing, Depends(get_completions)]

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(get_api_key)])


@v1.post("/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, chat: ChatDep,
                                 api_key: ApiKeyDep) -> Response:
    """Create a guarded chat completion (OpenAI Chat Completions API)."""
    result = await chat.create(body, is_disconnected=request.is_disconnected, api_key=api_key)
    return _respond(result)


@v1.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request, completions: CompletionDep,
                            api_key: ApiKeyDep) -> Response:
    """Create a guarded text completion (OpenAI Completions API)."""
    result = await completions.create(body, is_disconnected=request.is_disconnected, api_key=api_key)
    return _respond(result)


@v1.get("/models", response_model=None)
async def list_models(service: ServiceDep) -> Response:
    """List the served models (one per policy)."""
    return _respond(model_list(service))


@v1.get("/models/{model:path}", response_model=None)
async def retrieve_model(model: str, service: ServiceDep) -> Response:
    """Describe one served model."""
    card = model_card(service, model)
    if card is None:
        raise NotFoundError(f"The model '{model}' does not exist.", param="model")
    return _respond(card)


@router.get("/health", response_model=None)
async def health(service: ServiceDep) -> Response:
    """Liveness and engine statistics (no API key needed)."""
    return JSONResponse(service.health())


router.include_router(v1)


def _respond(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
