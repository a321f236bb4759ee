"""The FastAPI application: settings, the lifespan that owns the guard service, and ``run``.

Nothing is built at import time. :func:`create_app` takes settings (policy files, API keys) or a
``service_factory``; the service is built when the app starts (in a thread: loading models
blocks) and closed when it stops, so tests can start an app on their own service or override
:func:`server.routes.get_service`. While it runs, a background task asks a reloadable service to
pick up edited policy files every ``reload_interval_s`` (no file-watching dependency: it polls).
The lifespan also builds the app's own OpenTelemetry meter provider, read by ``/metrics``
(Prometheus text; open like ``/health`` unless ``GUARD_ADMIN_KEY`` is set, then that bearer key).
With an admin key configured, the app also serves the review page and API (:mod:`server.review`,
:mod:`server.review_page`); without one they do not exist. :func:`run` drains on SIGTERM: ``/ready``
fails, new requests get 503, requests in flight finish within a grace period (:mod:`server.drain`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Protocol, runtime_checkable

from fastapi import FastAPI, Header, Request, Response

import guard
from guard.errors import InvalidRequestError, NotFoundError
from guard.telemetry import Telemetry
from guard.telemetry.export import PrometheusMetrics, otlp_metric_readers
from server.auth import ADMIN_KEY_ENV, admin_key_in_force, bearer_token, check_admin
from server.drain import DEFAULT_GRACE_S, Drain, DrainMiddleware, serve
from server.drain import router as drain_router
from server.errors import install_error_handlers
from server.limits import BodyLimit, RequestLimits
from server.openapi import install_openapi
from server.review import router as review_router
from server.review_page import page_router
from server.routes import router
from server.serving import GenerationService

log = logging.getLogger(__name__)

API_KEYS_ENV = "GUARD_API_KEYS"
LOG_URL_ENV = "GUARD_LOG_URL"
DRAIN_GRACE_ENV = "GUARD_DRAIN_GRACE_S"
RELOAD_SHUTDOWN_WAIT_S = 2.0
"""How long shutdown waits for a policy reload in progress before closing the service anyway."""


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
    log_url: str | None = field(default=None, repr=False)
    """One log (path or database URL) for every policy instead of each policy's ``log`` target
    (``$GUARD_LOG_URL``); ``None``: the policies' own."""
    drain_grace_s: float = DEFAULT_GRACE_S
    """On SIGTERM, how long requests in flight may run before they are interrupted (:mod:`server.drain`)."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """What one request may contain (body bytes, messages, characters, tokens, generations)."""

    def __post_init__(self) -> None:
        if self.admin_key is not None and not self.admin_key.strip():
            raise ValueError(
                "admin_key: an empty admin key would open the review API; leave it None to close it"
            )
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ValueError("admin_key: the admin key must not also be one of api_keys")
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s: must be >= 0 seconds, got {self.drain_grace_s}")

    @classmethod
    def from_env(
        cls,
        policy_paths: Sequence[str],
        api_keys: Sequence[str] | None = None,
        reload_interval_s: float | None = 1.0,
        log_content: bool = False,
        admin_key_env: str | None = None,
        log_url: str | None = None,
        drain_grace_s: float | None = None,
    ) -> ServerSettings:
        """Settings whose API keys default to the comma-separated ``GUARD_API_KEYS`` and whose admin
        key is ``$GUARD_ADMIN_KEY`` (unset: no review API), or ``$admin_key_env``, which must be set;
        ``log_url`` defaults to ``$GUARD_LOG_URL`` and ``drain_grace_s`` to ``$GUARD_DRAIN_GRACE_S``."""
        if api_keys is None:
            api_keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        admin_key = os.environ.get(admin_key_env or ADMIN_KEY_ENV, "").strip() or None
        if admin_key_env and admin_key is None:
            raise InvalidRequestError(
                f"--admin-key-env {admin_key_env}: the environment variable {admin_key_env} "
                "is not set (or empty); export the admin key in it",
                param="admin_key_env",
            )
        log_url = log_url or os.environ.get(LOG_URL_ENV, "").strip() or None
        if drain_grace_s is None:
            raw = os.environ.get(DRAIN_GRACE_ENV, "").strip()
            try:
                drain_grace_s = float(raw) if raw else DEFAULT_GRACE_S
            except ValueError:
                raise InvalidRequestError(
                    f"{DRAIN_GRACE_ENV}={raw!r}: not a number of seconds", param="drain_grace_s"
                ) from None
        return cls(
            policy_paths=tuple(str(p) for p in policy_paths),
            api_keys=tuple(api_keys),
            reload_interval_s=reload_interval_s,
            log_content=log_content,
            admin_key=admin_key,
            log_url=log_url,
            drain_grace_s=drain_grace_s,
        )


@runtime_checkable
class Reloadable(Protocol):
    """A service that can re-read its policy files (``guard.service.GuardService``)."""

    def reload_changed(self) -> list[str]: ...


ServiceFactory = Callable[[], GenerationService]


def create_app(
    settings: ServerSettings | None = None, *, service_factory: ServiceFactory | None = None
) -> FastAPI:
    """The app; the service comes from ``service_factory`` or from ``settings.policy_paths``."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.metrics = metrics = PrometheusMetrics(otlp_metric_readers())
        telemetry = Telemetry(meter_provider=metrics.provider, log_content=settings.log_content)
        factory = service_factory or (
            lambda: _guard_service(settings.policy_paths, telemetry, settings.log_url)
        )
        app.state.service = service = await asyncio.to_thread(factory)
        stop = asyncio.Event()
        interval = settings.reload_interval_s
        watcher = (
            asyncio.create_task(_watch_policies(service, interval, stop))
            if interval and isinstance(service, Reloadable)
            else None
        )
        try:
            yield
        finally:
            stop.set()
            if watcher is not None:
                # A reload in progress gets a moment to finish; one that takes longer (loading a model)
                # must not hold up shutdown: its thread is a daemon and the service refuses its swap.
                await asyncio.wait({watcher}, timeout=RELOAD_SHUTDOWN_WAIT_S)
                watcher.cancel()
            close = getattr(service, "aclose", None)
            if close is not None:
                await close()
            metrics.shutdown()

    app = FastAPI(
        title="guard",
        version=guard.__version__,
        lifespan=lifespan,
        description="OpenAI-compatible server for guarded generation.",
    )
    app.state.settings = settings
    app.state.drain = drain = Drain(settings.drain_grace_s)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    # Added last, so outermost: a request is in flight from its headers on, also while its body uploads.
    app.add_middleware(DrainMiddleware, drain=drain)
    app.include_router(router)
    app.include_router(drain_router)
    if settings.admin_key:  # the review page and API exist only behind an admin key
        app.include_router(review_router)
        app.include_router(page_router)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    install_openapi(app)
    return app


def metrics_endpoint(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Response:
    """Prometheus metrics (they name every policy); needs ``Bearer $GUARD_ADMIN_KEY`` when that is
    set; without it, open only on a server with no API keys at all (like ``/health/detail``), else 404."""
    settings = request.app.state.settings
    admin_key = admin_key_in_force(settings.admin_key)
    if admin_key:
        check_admin(bearer_token(authorization), admin_key, "/metrics")
    elif settings.api_keys or request.app.state.service.key_bindings():
        raise NotFoundError(
            "Unknown request URL. Set GUARD_ADMIN_KEY to read /metrics on a server with API keys.",
            code="unknown_url",
        )
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
            await _in_daemon_thread(service.reload_changed)
        except Exception:  # the watcher must outlive any one failure
            log.exception("policy reload failed")


async def _in_daemon_thread(fn: Callable[[], object]) -> object:
    """``fn()`` in a daemon thread of its own: unlike ``asyncio.to_thread``'s executor, which the
    event loop joins when it closes, a reload still running at exit cannot delay the process."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: object, exc: BaseException | None) -> None:
        if not done.done():
            done.set_exception(exc) if exc is not None else done.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name="guard-policy-reload", daemon=True).start()
    return await done


def _guard_service(
    policy_paths: Sequence[str], telemetry: Telemetry, log_url: str | None
) -> GenerationService:
    from guard.service import GuardService  # loads torch and the engines: only when the app starts

    return GuardService.from_policy_files(list(policy_paths), telemetry, log_url)


def run(
    policy_paths: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_keys: Sequence[str] | None = None,
    log_level: str = "info",
    reload_interval_s: float | None = 1.0,
    log_content: bool = False,
    admin_key_env: str | None = None,
    log_url: str | None = None,
    drain_grace_s: float | None = None,
) -> None:
    """Serve ``policy_paths`` with uvicorn (``guard serve``), draining on SIGTERM (:mod:`server.drain`);
    settings left ``None`` come from the environment (:meth:`ServerSettings.from_env`)."""
    settings = ServerSettings.from_env(
        policy_paths,
        api_keys,
        reload_interval_s,
        log_content,
        admin_key_env,
        log_url,
        drain_grace_s,
    )
    if not settings.api_keys and not _is_loopback(host):
        log.warning(
            "serving on %s without API keys: anyone who can reach this port can use the models "
            "(set %s or pass api_keys)",
            host,
            API_KEYS_ENV,
        )
    serve(create_app(settings), host=host, port=port, log_level=log_level)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
