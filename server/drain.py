"""Graceful drain: what a replica does between SIGTERM (or Ctrl+C) and its exit.

Contract, in order:
1. The first SIGTERM/SIGINT starts the drain; the server keeps listening. ``/ready`` answers 503
   (a load balancer or Kubernetes stops routing here) and every new ``/v1/*`` request gets a 503
   OpenAI error (``service_unavailable``) with ``Retry-After`` (the official clients retry it,
   landing on another replica). ``/health`` (liveness), ``/metrics`` and the review API stay up.
2. Requests already in flight run to their end, up to ``grace_s`` seconds; their records are
   written as usual.
3. If some are still running then, each stream ends with a 503 error event (then ``[DONE]``), its
   generation is cancelled, and a flagged one is logged with outcome ``interrupted``
   (:meth:`guard.service.GuardService.interrupt`).
4. Then uvicorn shuts down as usual: the lifespan closes the service, whose engine workers close
   every job left, so no record is lost.
A second signal skips what is left of the drain (uvicorn's own shutdown; a third SIGINT forces it).

Kubernetes: ``terminationGracePeriodSeconds`` must exceed ``grace_s`` plus the shutdown itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from guard.errors import GuardError, UnavailableError
from server.errors import json_error

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
INTERRUPT_WAIT_S = 10.0
"""After the grace period: how long the interrupted streams get to send their error event."""


class Drain:
    """The drain state one app shares between its middleware, ``/ready`` and the signal handler."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        if grace_s < 0:
            raise ValueError(f"drain grace_s must be >= 0, got {grace_s}")
        self.grace_s = grace_s
        self.draining = False
        self.inflight = 0
        """OpenAI API requests (:class:`DrainMiddleware`) between their headers in and their last byte out."""
        self._changed: asyncio.Event | None = None

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            log.info(
                "draining: %d request(s) in flight, up to %.0f s to finish",
                self.inflight,
                self.grace_s,
            )

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self._changed is not None:
            self._changed.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; ``False`` if ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while self.inflight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return False
        return True


class DrainMiddleware:
    """Counts ``/v1/*`` requests in flight (not the review API, ``/v1/guard/``) and turns new ones
    away with 503 while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if not path.startswith("/v1/") or path.startswith("/v1/guard/"):  # the review API stays up
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await json_error(
                UnavailableError(
                    "This server is shutting down; retry the request "
                    "(another replica will take it).",
                    code="draining",
                )
            )(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


router = APIRouter()


@router.get("/ready", response_model=None)
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the engines are loaded (the server listens only then), 503 while draining."""
    drain: Drain = request.app.state.drain
    if drain.draining:
        return JSONResponse({"status": "draining", "inflight": drain.inflight}, status_code=503)
    return JSONResponse({"status": "ready", "inflight": drain.inflight})


Interrupt = Callable[[GuardError], int]


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains (see the module docstring) before it exits."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, interrupt: Callable[[], Interrupt | None]
    ) -> None:
        """``interrupt``: returns the service's ``interrupt`` (``None``: it cannot be interrupted)."""
        super().__init__(config)
        self.drain = drain
        self._interrupt = interrupt
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self._loop is None or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)  # a second signal: uvicorn's own shutdown now
            return
        self.drain.begin()
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if not await self.drain.wait_idle(self.drain.grace_s):
            interrupt = self._interrupt()
            n = (
                interrupt(
                    UnavailableError(
                        "This server shut down before the generation finished "
                        f"(drain grace period {self.drain.grace_s:g} s "
                        "over); retry the request.",
                        code="interrupted",
                    )
                )
                if interrupt is not None
                else 0
            )
            log.warning(
                "drain grace period over: interrupted %d generation(s), %d request(s) in flight",
                n,
                self.drain.inflight,
            )
            await self.drain.wait_idle(INTERRUPT_WAIT_S)
        log.info("drained: shutting down")
        self.should_exit = True


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    """Run ``app`` (from :func:`server.app.create_app`) with uvicorn, draining on the first signal."""
    # uvicorn annotates the timeout as an int; it is used as asyncio.wait_for's (float) timeout.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=INTERRUPT_WAIT_S,  # type: ignore[arg-type]
    )
    DrainingServer(
        config,
        app.state.drain,
        lambda: getattr(getattr(app.state, "service", None), "interrupt", None),
    ).run()
