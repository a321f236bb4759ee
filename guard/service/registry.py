"""The served policies: each loaded with its engine, worker, monitors and log store, and swapped
whole when its file changes (hot reload).

Invariants: a prepared generation holds its :class:`Served` (policy, engine, monitors, config, log
store), so a generation in flight finishes under the policy it started with while new requests get
the new one. :attr:`PolicyRegistry.served` is never mutated, only replaced whole, so readers on the
event loop always see a consistent set. An engine is reused when the model fields are unchanged
(:func:`guard.policy.build.engine_key`); a new one is loaded before the swap. An invalid edit
changes nothing: the last good policy keeps serving and the error is kept for the health report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.controller.backtrack import BoundMonitor, ControllerConfig
from guard.engine.base import Engine
from guard.engine.worker import EngineWorker
from guard.errors import GuardError, NotFoundError, PolicyError
from guard.logstore import LogStore
from guard.logstore.writer import LogWriter
from guard.policy import Policy, load_policy
from guard.policy.build import build_engine, build_monitors, controller_config, engine_key
from guard.policy.loader import read_policy_bytes

log = logging.getLogger(__name__)

RETIRE_GRACE_S = 10.0
"""An engine no policy uses any more is stopped once idle and retired at least this long, so that
a request prepared just before a swap still finds its worker running."""


@dataclass
class Served:
    """A loaded policy: its engine, worker, monitors, controller config and log store."""

    policy: Policy
    engine: Engine
    worker: EngineWorker
    monitors: list[BoundMonitor]
    config: ControllerConfig
    store: LogStore
    created: int
    api_keys: frozenset[str] | None
    """Keys bound by the policy's ``access`` section (env variables read); ``None`` without one."""


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``/v1/models``: a policy served under its name."""

    id: str
    created: int
    owned_by: str = "guard"
    policy: str = ""
    root: str = ""
    """The underlying model's name."""


@dataclass
class _Source:
    """A policy file the registry watches, and what its last reload attempt found."""

    path: Path
    name: str
    """Name of the policy it currently serves (the last good version's)."""
    digest: str
    """sha256 of the bytes last examined, valid or not (a changed digest triggers a reload)."""
    error: str | None = None
    reloads: int = 0


class PolicyRegistry:
    """The served policies by name, the engines, log stores and writers they share, and hot reload."""

    def __init__(self, policies: list[Policy], log_url: str | None = None) -> None:
        """``log_url``: one log for every policy instead of each policy's own ``log`` target."""
        if not policies:
            raise PolicyError("<none>", ["no policy to serve"])
        names = [p.name for p in policies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PolicyError(
                str(policies[0].source_path), [f"two policies are named {d!r}" for d in dupes]
            )
        self.engines: dict[tuple, tuple[Engine, EngineWorker]] = {}
        self.retired: list[tuple[float, Engine, EngineWorker]] = []
        self.stores: dict[str, LogStore] = {}
        """Open log stores by target (path or URL): policies naming the same log share one."""
        self.writers: dict[int, LogWriter] = {}
        """The writer thread of each store (by ``id(store)``): the engine never waits on the log."""
        self.served: dict[str, Served] = {}
        self._log_url = log_url
        self._sources = [
            _Source(p.source_path, p.name, p.content_hash) for p in policies if p.source_path
        ]
        self.closed = False
        try:
            for policy in policies:
                self.served[policy.name] = self._load(policy)
        except BaseException:
            self.close()
            raise

    # -- loading ------------------------------------------------------------------------------

    def _load(self, policy: Policy, created: int | None = None) -> Served:
        keys = policy.access.resolve_keys(os.environ) if policy.access is not None else None
        engine, worker = self._engine_for(policy)
        monitors = build_monitors(policy, engine)
        # a path or URL; url_env read here, like access keys
        log_target = self._log_url or policy.log.target(os.environ)
        if log_target not in self.stores:
            store = self.stores[log_target] = LogStore.open(log_target)
            self.writers[id(store)] = LogWriter(store, name=f"guard-log-writer-{len(self.writers)}")
        return Served(
            policy,
            engine,
            worker,
            monitors,
            controller_config(policy),
            self.stores[log_target],
            created or int(time.time()),
            keys,
        )

    def _engine_for(self, policy: Policy) -> tuple[Engine, EngineWorker]:
        key = engine_key(policy.model)
        if key not in self.engines:
            engine = build_engine(policy.model)
            self.engines[key] = (engine, EngineWorker(name=f"guard-engine-{len(self.engines)}"))
        return self.engines[key]

    def writer(self, served: Served) -> LogWriter:
        """The writer thread of ``served``'s log store."""
        return self.writers[id(served.store)]

    # -- hot reload ---------------------------------------------------------------------------

    def reload_changed(self) -> list[str]:
        """Reload every policy file whose bytes changed; return the names swapped in.

        Blocking (it may load a model): the server calls it in a thread. Never raises for a bad
        file: the error is logged and kept for :meth:`health` until a later edit fixes it.
        """
        swapped: list[str] = []
        for src in self._sources:
            if self.closed:
                return swapped
            try:
                digest = hashlib.sha256(read_policy_bytes(src.path)).hexdigest()
            except PolicyError as exc:  # unreadable, not a regular file, too large
                digest = f"unreadable: {exc.errors[0]}"
            if digest == src.digest:
                continue
            src.digest = digest
            try:
                policy = load_policy(src.path)
                if self.closed:  # the server is shutting down: swap nothing into a closed service
                    return swapped
                self._swap(src, policy)
            except Exception as exc:  # noqa: BLE001 - a bad edit must never take the server down
                src.error = (
                    str(exc)
                    if isinstance(exc, GuardError)
                    else f"{src.path}: {type(exc).__name__}: {exc}"
                )
                log.error(
                    "policy %s not reloaded, still serving the last good version:\n%s",
                    src.path,
                    src.error,
                )
                continue
            src.digest = policy.content_hash
            src.error = None
            src.reloads += 1
            swapped.append(policy.name)
            log.info(
                "policy %s reloaded from %s (sha256 %s)",
                policy.name,
                src.path,
                policy.content_hash[:12],
            )
        self._retire_unused()  # also engines loaded for an edit that then failed
        self._stop_retired(RETIRE_GRACE_S)
        return swapped

    def _swap(self, src: _Source, policy: Policy) -> None:
        """Build ``policy`` (a new engine only if its model fields changed) and swap it in for ``src``."""
        other = next((s for s in self._sources if s is not src and s.name == policy.name), None)
        if other is not None:
            raise PolicyError(
                str(src.path),
                [
                    f"{src.path}: name: policy name {policy.name!r} is already served from {other.path}"
                ],
            )
        old = self.served[src.name]
        new = self._load(policy, created=old.created if policy.name == src.name else None)
        self.served = {
            (policy.name if name == src.name else name): (new if name == src.name else s)
            for name, s in self.served.items()
        }
        src.name = policy.name

    def _retire_unused(self) -> None:
        used = {id(s.engine) for s in self.served.values()}
        for key, (engine, worker) in list(self.engines.items()):
            if id(engine) not in used:
                del self.engines[key]
                self.retired.append((time.monotonic(), engine, worker))

    def _stop_retired(self, grace_s: float) -> None:
        now = time.monotonic()
        keep = []
        for since, engine, worker in self.retired:
            if worker.active == 0 and now - since >= grace_s:
                worker.stop()
                engine.close()
                log.info("stopped engine %s: no policy uses it any more", engine.info.name)
            else:
                keep.append((since, engine, worker))
        self.retired = keep

    # -- lookups ------------------------------------------------------------------------------

    def resolve(self, model: str, allowed: frozenset[str] | None = None) -> Served:
        """The served policy ``model``; :class:`NotFoundError` if unknown or not in ``allowed``.

        A model the caller may not use is reported exactly like one that does not exist, so a
        tenant's key reveals nothing about other tenants' policies.
        """
        served = self.served
        visible = sorted(n for n in served if allowed is None or n in allowed)
        if model not in visible:
            raise NotFoundError(
                f"The model `{model}` does not exist or you do not have access to it. Served "
                "models: " + (", ".join(visible) or "none"),
                param="model",
            )
        return served[model]

    def list_models(self) -> list[ServedModel]:
        # root: this policy's own name for its model, never the shared engine's (which is named after
        # whichever policy loaded it first, possibly another tenant's).
        return [
            ServedModel(
                id=name, created=s.created, policy=name, root=s.policy.model.served_name or name
            )
            for name, s in self.served.items()
        ]

    def key_bindings(self) -> dict[str, frozenset[str]]:
        """API key -> the policies that bind it (keys from ``access`` sections only)."""
        bindings: dict[str, set[str]] = {}
        for name, s in self.served.items():
            for key in s.api_keys or ():
                bindings.setdefault(key, set()).add(name)
        return {k: frozenset(v) for k, v in bindings.items()}

    def health(self) -> dict[str, Any]:
        """Per served policy: hash, engine, monitors, source file and its last reload error; and the
        active generations and engine stats."""
        sources = {src.name: src for src in self._sources}
        engines = list(self.engines.values())
        workers = [w for _, w in engines] + [w for _, _, w in self.retired]

        def model(name: str, s: Served) -> dict[str, Any]:
            src = sources.get(name)
            return {
                "id": name,
                "policy_hash": s.policy.content_hash,
                "engine": s.policy.model.engine,
                "monitors": [b.monitor.name for b in s.monitors],
                "source": str(src.path) if src else None,
                "reloads": src.reloads if src else 0,
                "reload_error": src.error if src else None,
            }

        return {
            "models": [model(n, s) for n, s in self.served.items()],
            "active_generations": sum(w.active for w in workers),
            "engine_stats": [dataclasses.asdict(e.stats) for e, _ in engines],
        }

    def close(self) -> None:
        self.closed = True
        for engine, worker in self.engines.values():
            worker.stop()
            engine.close()
        for _, engine, worker in self.retired:
            worker.stop()
            engine.close()
        self.retired.clear()
        for writer in self.writers.values():
            writer.close()  # what is queued is written first
        self.writers.clear()
        for store in self.stores.values():
            store.close()
        self.engines.clear()
        self.stores.clear()
