"""The FastAPI application: settings, the lifespan that owns the guard service, and ``run``.

Nothing is built at import time. :func:`create_app` takes settings (policy files, API keys) or a
``service_factory``; the service is built when the app starts (in a thread: loading models
blocks) and closed when it stops, so tests can start an app on their own service or override
:func:`server.routes.get_service`. While it runs, a background task asks a reloadable service to
pick up edited policy files every ``reload_interval_s`` (no file-watching dependency: it polls).
The lifespan also builds the app's own OpenTelemetry meter provider, read by ``/metrics``
(Prometheus text; open like ``/health`` unless ``GUARD_ADMIN_KEY`` is set, then that bearer key).
With an admin key configured, the app also serves the review page and API (:mod:`server.review`,
:mod:`server.review_page`); without one they do not exist.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Protocol, runtime_checkable

from fastapi import FastAPI, Header, Request, Response

import guard
from guard.telemetry import Telemetry
from guard.telemetry.export import PrometheusMetrics, otlp_metric_readers
from server.auth import authenticate
from guard.errors import InvalidRequestError
from server.errors import install_error_handlers
from server.openapi import install_openapi
from server.review import router as review_router
from server.review_page import page_router
from server.routes import router
from server.serving import GenerationService

log = logging.getLogger(__name__)

API_KEYS_ENV = "GUARD_API_KEYS"
ADMIN_KEY_ENV = "GUARD_ADMIN_KEY"


@dataclass(frozen=True)
class ServerSettings:
    """What the app serves and who may call it."""

    policy_paths: tuple[str, ...] = ()
    """Policy files; each is served as one model."""
    api_keys: tuple[str, ...] = ()
    """Global bearer keys (every policy); with these and the policies' bound keys all empty, there is
    no authentication (fine on localhost only)."""
    reload_interval_s: float | None = 1.0
    """How often to check the policy files for edits; ``None`` or 0 turns hot reload off."""
    log_content: bool = False
    """Put prompt and answer text in the ``guard.requests`` log lines (off: counts and ids only)."""
    admin_key: str | None = field(default=None, repr=False)
    """Bearer key of the review page and API (``/review``, ``/v1/guard/review``); ``None``: they do
    not exist (404). Never a tenant or global API key."""

    def __post_init__(self) -> None:
        if self.admin_key is not None and not self.admin_key.strip():
            raise ValueError("admin_key: an empty admin key would open the review API; leave it None to close it")
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ValueError("admin_key: the admin key must not also be one of api_keys")

    @classmethod
    def from_env(cls, policy_paths: Sequence[str], api_keys: Sequence[str] | None = None,
                 reload_interval_s: float | None = 1.0, log_content: bool = False,
                 admin_key_env: str | None = None) -> ServerSettings:
        """Settings whose API keys default to the comma-separated ``GUARD_API_KEYS`` and whose admin
        key is ``$GUARD_ADMIN_KEY`` (unset: no review API), or ``$admin_key_env``, which must be set."""
        if api_keys is None:
            api_keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        admin_key = os.environ.get(admin_key_env or ADMIN_KEY_ENV, "").strip() or None
        if admin_key_env and admin_key is None:
            raise InvalidRequestError(f"--admin-key-env {admin_key_env}: the environment variable {admin_key_env} "
                                      "is not set (or empty); export the admin key in it", param="admin_key_env")
        return cls(policy_paths=tuple(str(p) for p in policy_paths), api_keys=tuple(api_keys),
                   reload_interval_s=reload_interval_s, log_content=log_content, admin_key=admin_key)


@runtime_checkable
class Reloadable(Protocol):
    """A service that can re-read its policy files (``guard.service.GuardService``)."""

    def reload_changed(self) -> list[str]: ...


ServiceFactory = Callable[[], GenerationService]


def create_app(settings: ServerSettings | None = None, *, service_factory: ServiceFactory | None = None) -> FastAPI:
    """The app; the service comes from ``service_factory`` or from ``settings.policy_paths``."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.metrics = metrics = PrometheusMetrics(otlp_metric_readers())
        telemetry = Telemetry(meter_provider=metrics.provider, log_content=settings.log_content)
        factory = service_factory or (lambda: _guard_service(settings.policy_paths, telemetry))
        app.state.service = service = await asyncio.to_thread(factory)
        stop = asyncio.Event()
        interval = settings.reload_interval_s
        watcher = (asyncio.create_task(_watch_policies(service, interval, stop))
                   if interval and isinstance(service, Reloadable) else None)
        try:
            yield
        finally:
            stop.set()
            if watcher is not None:
                await watcher  # lets a reload in progress finish before the service closes
            close = getattr(service, "aclose", None)
            if close is not None:
                await close()
            metrics.shutdown()

    app = FastAPI(title="guard", version=guard.__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for guarded generation.")
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    if settings.admin_key:  # the review page and API exist only behind an admin key
        app.include_router(review_router)
        app.include_router(page_router)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    install_openapi(app)
    return app


def metrics_endpoint(request: Request, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Prometheus metrics; needs ``Bearer $GUARD_ADMIN_KEY`` when that is set, else open like /health."""
    admin_key = request.app.state.settings.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if admin_key:
        authenticate(authorization, (admin_key,), {})
    metrics: PrometheusMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


async def _watch_policies(service: Reloadable, interval: float, stop: asyncio.Event) -> None:
    """Every ``interval`` seconds, reload edited policy files (in a thread: it may load a model)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except TimeoutError:
            pass
        try:
            await asyncio.to_thread(service.reload_changed)
        except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
            log.exception("policy reload failed")


def _guard_service(policy_paths: Sequence[str], telemetry: Telemetry) -> GenerationService:
    from guard.service import GuardService  # loads torch and the engines: only when the app starts

    return GuardService.from_policy_files(list(policy_paths), telemetry)


def run(policy_paths: Sequence[str], host: str = "127.0.0.1", port: int = 8000, *,
        api_keys: Sequence[str] | None = None, log_level: str = "info", reload_interval_s: float | None = 1.0,
        log_content: bool = False, admin_key_env: str | None = None) -> None:
    """Serve ``policy_paths`` with uvicorn (``guard serve``); API keys default to ``$GUARD_API_KEYS``."""
    import uvicorn

    settings = ServerSettings.from_env(policy_paths, api_keys, reload_interval_s, log_content, admin_key_env)
    if not settings.api_keys and not _is_loopback(host):
        log.warning("serving on %s without API keys: anyone who can reach this port can use the models "
                    "(set %s or pass api_keys)", host, API_KEYS_ENV)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
