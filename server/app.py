"""The FastAPI application: settings, the lifespan that owns the guard service, and ``run``.

Nothing is built at import time. :func:`create_app` takes settings (policy files, API keys) or a
``service_factory``; the service is built when the app starts (in a thread: loading models
blocks) and closed when it stops, so tests can start an app on their own service or override
:func:`server.routes.get_service`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

import guard
from server.errors import install_error_handlers
from server.routes import router
from server.serving import GenerationService

log = logging.getLogger(__name__)

API_KEYS_ENV = "GUARD_API_KEYS"


@dataclass(frozen=True)
class ServerSettings:
    """What the app serves and who may call it."""

    policy_paths: tuple[str, ...] = ()
    """Policy files; each is served as one model."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer keys; empty means no authentication (fine on localhost only)."""

    @classmethod
    def from_env(cls, policy_paths: Sequence[str], api_keys: Sequence[str] | None = None) -> ServerSettings:
        """Settings whose API keys default to the comma-separated ``GUARD_API_KEYS``."""
        if api_keys is None:
            api_keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return cls(policy_paths=tuple(str(p) for p in policy_paths), api_keys=tuple(api_keys))


ServiceFactory = Callable[[], GenerationService]


def create_app(settings: ServerSettings | None = None, *, service_factory: ServiceFactory | None = None) -> FastAPI:
    """The app; the service comes from ``service_factory`` or from ``settings.policy_paths``."""
    settings = settings or ServerSettings()
    factory = service_factory or (lambda: _guard_service(settings.policy_paths))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = await asyncio.to_thread(factory)
        try:
            yield
        finally:
            close = getattr(app.state.service, "aclose", None)
            if close is not None:
                await close()

    app = FastAPI(title="guard", version=guard.__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for guarded generation.")
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    return app


def _guard_service(policy_paths: Sequence[str]) -> GenerationService:
    from guard.service import GuardService  # loads torch and the engines: only when the app starts

    return GuardService.from_policy_files(list(policy_paths))


def run(policy_paths: Sequence[str], host: str = "127.0.0.1", port: int = 8000, *,
        api_keys: Sequence[str] | None = None, log_level: str = "info") -> None:
    """Serve ``policy_paths`` with uvicorn (``guard serve``); API keys default to ``$GUARD_API_KEYS``."""
    import uvicorn

    settings = ServerSettings.from_env(policy_paths, api_keys)
    if not settings.api_keys and not _is_loopback(host):
        log.warning("serving on %s without API keys: anyone who can reach this port can use the models "
                    "(set %s or pass api_keys)", host, API_KEYS_ENV)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
