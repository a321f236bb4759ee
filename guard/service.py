"""The guard service: what the server calls. Owns engines, policies, the worker and the log.

Contract for the server layer (``server/serving.py``):

- :meth:`GuardService.list_models` -> the served model aliases (one per policy).
- :meth:`GuardService.prepare` validates and tokenises a request *before* any response is sent,
  raising :class:`~guard.errors.NotFoundError` (unknown model, ``param="model"``),
  :class:`~guard.errors.ContextLengthError` or :class:`~guard.errors.InvalidRequestError`, so
  that a stream can still answer with a proper HTTP status.
- :meth:`GuardService.stream` yields :mod:`guard.controller.events` events for one prepared
  generation; closing the async iterator early (client disconnect) cancels the generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.controller.backtrack import BoundMonitor, ControllerConfig, GuardedGeneration, Strategy
from guard.controller.events import Event, Failed, Finished
from guard.controller.record import GenerationRecord
from guard.engine.base import Engine
from guard.engine.transformers_engine import TransformersEngine
from guard.engine.worker import EngineWorker
from guard.errors import ContextLengthError, InvalidRequestError, NotFoundError, PolicyError
from guard.logstore import LogStore
from guard.monitors.probe import ProbeMonitor
from guard.monitors.reset_token import ResetTokenMonitor
from guard.policy import Policy, load_policy
from guard.sampling import SamplingParams, check_token_ids


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as the server received it; ``None`` means "the policy's default"."""

    model: str
    request_id: str
    messages: list[dict[str, Any]] | None = None
    """Chat messages (``/v1/chat/completions``); exactly one of messages/prompt is set."""
    prompt: str | list[int] | None = None
    """Raw prompt text or token ids (``/v1/completions``); no chat template is applied."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_token_ids: frozenset[int] = frozenset()
    api_key: str | None = None


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
class PreparedGeneration:
    """A validated, tokenised request, ready for :meth:`GuardService.stream`."""

    request: GenerationRequest
    served: "_Served"
    prompt_ids: list[int]
    params: SamplingParams

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def model(self) -> str:
        return self.served.policy.name

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class _Served:
    """A loaded policy: its engine, worker, monitors, controller config and log store."""

    policy: Policy
    engine: Engine
    worker: EngineWorker
    monitors: list[BoundMonitor]
    config: ControllerConfig
    store: LogStore
    created: int


class GuardService:
    """Serves one or more policies. Build with :meth:`from_policy_files`; close with :meth:`aclose`."""

    def __init__(self, policies: list[Policy]) -> None:
        if not policies:
            raise PolicyError("<none>", ["no policy to serve"])
        names = [p.name for p in policies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PolicyError(str(policies[0].source_path), [f"two policies are named {d!r}" for d in dupes])
        self._engines: dict[tuple, tuple[Engine, EngineWorker]] = {}
        self._stores: dict[Path, LogStore] = {}
        self._served: dict[str, _Served] = {}
        self._started = time.time()
        try:
            for policy in policies:
                self._served[policy.name] = self._load(policy)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_policy_files(cls, paths: list[str | Path]) -> "GuardService":
        return cls([load_policy(p) for p in paths])

    # -- loading ------------------------------------------------------------------------------

    def _load(self, policy: Policy) -> _Served:
        engine, worker = self._engine_for(policy)
        monitors = [self._monitor(spec, policy, engine) for spec in policy.monitors]
        bt = policy.backtrack
        config = ControllerConfig(
            rollback=bt.rollback, rollback_tokens=bt.rollback_tokens, max_retries=bt.max_retries,
            refusal=bt.refusal, holdback_tokens=policy.stream.holdback_tokens,
            reset_marker=policy.stream.reset_marker,
            strategies=tuple(Strategy(temperature=s.temperature, top_p=s.top_p, reseed=s.reseed,
                                      ban_first_token=s.ban_first_token, steer_alpha=s.steer_alpha)
                             for s in bt.strategies))
        log_path = Path(policy.log.path)
        if log_path not in self._stores:
            self._stores[log_path] = LogStore(log_path)
        return _Served(policy, engine, worker, monitors, config, self._stores[log_path], int(time.time()))

    def _engine_for(self, policy: Policy) -> tuple[Engine, EngineWorker]:
        spec = policy.model
        key = (spec.engine, str(Path(spec.path).resolve()), spec.dtype, spec.device, spec.max_context)
        if key not in self._engines:
            if spec.engine != "transformers":
                raise PolicyError(str(policy.source_path),
                                  [f"model.engine: engine {spec.engine!r} is not available in this build; "
                                   "use engine: transformers"])
            engine = TransformersEngine.load(spec.path, dtype=spec.dtype, device=spec.device,
                                             name=spec.served_name, max_context=spec.max_context)
            self._engines[key] = (engine, EngineWorker(name=f"guard-engine-{len(self._engines)}"))
        return self._engines[key]

    @staticmethod
    def _monitor(spec, policy: Policy, engine: Engine) -> BoundMonitor:
        if spec.kind == "probe":
            agg = spec.aggregation.to_spec() if spec.aggregation is not None else None
            mon = ProbeMonitor.load(spec.path, name=spec.name, layer=spec.layer, threshold=spec.threshold,
                                    aggregation=agg)
            mon.check_compatible(engine.info, policy.model.path)
            return BoundMonitor(mon, action=spec.action)
        mon = ResetTokenMonitor.from_tokenizer(engine.tokenizer, spec.token, name=spec.name)
        # A model-native reset condemns everything it said before it: cut back to the response start.
        return BoundMonitor(mon, action=spec.action, rollback="response")

    # -- serving ------------------------------------------------------------------------------

    def list_models(self) -> list[ServedModel]:
        return [ServedModel(id=name, created=s.created, policy=name, root=s.engine.info.name)
                for name, s in self._served.items()]

    def resolve(self, model: str) -> _Served:
        served = self._served.get(model)
        if served is None:
            raise NotFoundError(f"The model `{model}` does not exist. Served models: "
                                + ", ".join(sorted(self._served)), param="model")
        return served

    def prepare(self, req: GenerationRequest) -> PreparedGeneration:
        """Validate and tokenise ``req``; raises before anything is sent to the client."""
        served = self.resolve(req.model)
        info, tok = served.engine.info, served.engine.tokenizer
        if req.messages is not None:
            prompt_ids, param = tok.encode_chat(req.messages), "messages"
        elif isinstance(req.prompt, str):
            prompt_ids, param = tok.encode(req.prompt), "prompt"
        elif req.prompt is not None:
            prompt_ids, param = [int(t) for t in req.prompt], "prompt"
            if any(not 0 <= t < info.vocab_size for t in prompt_ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {info.vocab_size})", param="prompt")
        else:
            raise InvalidRequestError("either messages or prompt is required", param="messages")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        room = info.context_length - len(prompt_ids)
        if room < 1:
            raise ContextLengthError(f"This model's maximum context length is {info.context_length} tokens; "
                                     f"the prompt has {len(prompt_ids)} tokens.", param=param)
        if req.max_tokens is not None and req.max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {info.context_length} tokens. However, you requested "
                f"{len(prompt_ids) + req.max_tokens} tokens ({len(prompt_ids)} in the prompt, {req.max_tokens} "
                "for the completion). Please reduce the prompt or max_tokens.", param="max_tokens")
        d = served.policy.defaults
        params = SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            top_k=req.top_k or 0, seed=req.seed,
            max_tokens=req.max_tokens if req.max_tokens is not None else min(d.max_tokens, room),
            stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids), logit_bias=dict(req.logit_bias),
            banned_token_ids=frozenset(req.banned_token_ids))
        check_token_ids(params, info.vocab_size)
        return PreparedGeneration(req, served, prompt_ids, params)

    async def stream(self, prepared: PreparedGeneration) -> AsyncIterator[Event]:
        """Run one guarded generation; closing this iterator early cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        job = self._job(prepared, emit)
        prepared.served.worker.submit(job)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            job.cancelled = True

    def _job(self, prepared: PreparedGeneration, emit) -> GuardedGeneration:
        served, req = prepared.served, prepared.request
        record = GenerationRecord(
            request_id=req.request_id, policy_name=served.policy.name, policy_hash=served.policy.content_hash,
            model=served.engine.info.name, messages=req.messages,
            prompt=req.prompt if isinstance(req.prompt, str) else None, prompt_tokens=len(prepared.prompt_ids))
        log_spec, store = served.policy.log, served.store

        def on_finish(rec: GenerationRecord) -> str | None:
            return store.write(rec) if log_spec.keeps(rec.flagged or bool(rec.firings)) else None

        return GuardedGeneration(served.engine, prepared.prompt_ids, prepared.params, served.monitors,
                                 served.config, record, emit, on_finish)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self._started, 1),
            "models": [{"id": n, "policy_hash": s.policy.content_hash, "engine": s.policy.model.engine,
                        "monitors": [b.monitor.name for b in s.monitors]} for n, s in self._served.items()],
            "active_generations": sum(w.active for _, w in self._engines.values()),
            "engine_stats": [dataclasses.asdict(e.stats) for e, _ in self._engines.values()],
        }

    def close(self) -> None:
        for _, worker in self._engines.values():
            worker.stop()
        for store in self._stores.values():
            store.close()
        self._engines.clear()
        self._stores.clear()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
