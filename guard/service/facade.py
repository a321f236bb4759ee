"""The guard service: the one object the server calls, composed of one part per job.

- :class:`~guard.service.registry.PolicyRegistry`: the served policies, their engines, workers,
  monitors and log stores, and hot reload of their files;
- :func:`~guard.service.prepare.prepare`: request validation and tokenisation;
- :class:`~guard.service.run.GenerationRunner`: running a generation on its engine worker and
  bridging its events to async;
- :class:`~guard.service.review.ReviewQueries`: what the review API reads.

Contract for the server layer (``server/serving.py``): :meth:`GuardService.list_models`,
:meth:`GuardService.prepare` (raises before any response is sent), :meth:`GuardService.stream`
(closing the iterator early cancels the generation), :meth:`GuardService.key_bindings`,
:meth:`GuardService.reload_changed` (about once a second, in a thread), :meth:`GuardService.interrupt`
and :meth:`GuardService.health`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from guard.controller.events import Event
from guard.controller.record import GenerationRecord
from guard.errors import GuardError
from guard.logstore import LogStore
from guard.logstore.writer import LogWriter
from guard.policy import Policy, load_policy
from guard.service.prepare import GenerationRequest, PreparedGeneration, prepare
from guard.service.registry import PolicyRegistry, Served, ServedModel
from guard.service.review import ReviewQueries
from guard.service.run import GenerationRunner
from guard.telemetry import Telemetry


class GuardService:
    """Serves one or more policies. Build with :meth:`from_policy_files`; close with :meth:`aclose`."""

    def __init__(
        self, policies: list[Policy], telemetry: Telemetry | None = None, log_url: str | None = None
    ) -> None:
        """``telemetry``: where traces, metrics and request log lines go (default: the global
        OpenTelemetry providers, no-op until an SDK is configured). ``log_url``: one log (a path or
        database URL) for every policy instead of each policy's own ``log`` target (``guard serve
        --log-url``, ``$GUARD_LOG_URL``: replicas and containers point all policies at one database)."""
        self._started = time.time()
        self.telemetry = telemetry or Telemetry()
        self.registry = PolicyRegistry(policies, log_url)
        self.runner = GenerationRunner(self.registry, self.telemetry)
        self.review = ReviewQueries(self.registry)

    @classmethod
    def from_policy_files(
        cls,
        paths: Sequence[str | Path],
        telemetry: Telemetry | None = None,
        log_url: str | None = None,
    ) -> GuardService:
        return cls([load_policy(p) for p in paths], telemetry, log_url)

    @property
    def _served(self) -> dict[str, Served]:
        """The served policies by name (tests and benchmarks reach into them)."""
        return self.registry.served

    @property
    def _writers(self) -> dict[int, LogWriter]:
        return self.registry.writers

    # -- serving ------------------------------------------------------------------------------

    def list_models(self) -> list[ServedModel]:
        return self.registry.list_models()

    def key_bindings(self) -> dict[str, frozenset[str]]:
        """API key -> the policies that bind it (keys from ``access`` sections only)."""
        return self.registry.key_bindings()

    def resolve(self, model: str, allowed: frozenset[str] | None = None) -> Served:
        """The served policy ``model``; :class:`~guard.errors.NotFoundError` if unknown or not allowed."""
        return self.registry.resolve(model, allowed)

    def prepare(self, req: GenerationRequest) -> PreparedGeneration:
        """Validate and tokenise ``req``; raises before anything is sent to the client."""
        return prepare(self.registry, req)

    def stream(self, prepared: PreparedGeneration) -> AsyncGenerator[Event, None]:
        """Run one guarded generation; closing this iterator early cancels it."""
        return self.runner.stream(prepared)

    def interrupt(self, err: GuardError) -> int:
        """End every running stream with ``err``; return how many there were."""
        return self.runner.interrupt(err)

    def reload_changed(self) -> list[str]:
        """Reload every policy file whose bytes changed; return the names swapped in (blocking)."""
        return self.registry.reload_changed()

    def health(self) -> dict[str, Any]:
        """Status per served policy, including the last reload error of its file (``None`` if fine)."""
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self._started, 1),
            **self.registry.health(),
        }

    # -- the log, for review --------------------------------------------------------------------

    def log_stores(self) -> list[LogStore]:
        return self.review.log_stores()

    def find_log(self, log_id: str) -> tuple[LogStore, str]:
        return self.review.find_log(log_id)

    def monitor_thresholds(self, policy_name: str, policy_hash: str) -> dict[str, float]:
        return self.review.monitor_thresholds(policy_name, policy_hash)

    def output_tokens(self, record: GenerationRecord) -> list[str] | None:
        return self.review.output_tokens(record)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self.registry.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
