"""The guard service: what the server calls. Owns engines, policies, the worker and the log.

Contract for the server layer (``server/serving.py``):

- :meth:`GuardService.list_models` -> the served model aliases (one per policy).
- :meth:`GuardService.prepare` validates and tokenises a request *before* any response is sent,
  raising :class:`~guard.errors.NotFoundError` (unknown model, ``param="model"``),
  :class:`~guard.errors.ContextLengthError` or :class:`~guard.errors.InvalidRequestError`, so
  that a stream can still answer with a proper HTTP status.
- :meth:`GuardService.stream` yields :mod:`guard.controller.events` events for one prepared
  generation; closing the async iterator early (client disconnect) cancels the generation.
- :meth:`GuardService.key_bindings` maps each API key bound by a policy's ``access`` section to
  the policies it may use; ``GenerationRequest.allowed_models`` carries that restriction.
- :meth:`GuardService.reload_changed` (called about once a second by the server, in a thread)
  re-reads every policy file and swaps in the ones whose content changed.

Hot reload invariants: a prepared generation holds its ``_Served`` (policy, engine, monitors,
config, log store), so a generation in flight finishes under the policy it started with while new
requests get the new one. ``_served`` is never mutated, only replaced whole, so readers on the
event loop always see a consistent set. An engine is reused when the model fields are unchanged;
a new one is loaded before the swap. An invalid edit changes nothing: the last good policy keeps
serving and the error is logged and shown in :meth:`GuardService.health`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.controller.backtrack import BoundMonitor, ControllerConfig, GuardedGeneration, Strategy
from guard.controller.deliberation import DeliberationConfig, neutralise_text, system_prompt
from guard.controller.events import Event, Failed, Finished
from guard.controller.record import GenerationRecord
from guard.engine.base import Engine
from guard.engine.transformers_engine import TransformersEngine
from guard.engine.worker import EngineWorker
from guard.errors import (
    ContextLengthError,
    GuardError,
    InvalidRequestError,
    ModelLoadError,
    NotFoundError,
    PolicyError,
)
from guard.logstore import LogStore
from guard.logstore.writer import GenerationLogging, LogWriter
from guard.monitors.base import Monitor
from guard.monitors.probe import ProbeMonitor
from guard.monitors.reset_token import ResetTokenMonitor
from guard.policy import Policy, load_policy
from guard.policy.loader import read_policy_bytes
from guard.sampling import SamplingParams, check_token_ids
from guard.telemetry import Telemetry


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
    allowed_models: frozenset[str] | None = None
    """The policies the caller's key may use; ``None``: every policy."""
    group: str | None = None
    """The client request this generation belongs to (its choices and prompts share one turn of the
    engine worker, so one request's fan-out cannot starve another request); ``None``: its own."""
    client_retracts: bool = True
    """The consumer applies :class:`~guard.controller.events.Reset` events (a library caller, a
    reset-aware stream, an answer sent whole at the end). ``False`` (the server sets it for every
    stream whose client did not opt in): only settled text is released and released text is never
    retracted (:mod:`guard.controller.release`)."""


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
    served: _Served
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
    api_keys: frozenset[str] | None
    """Keys bound by the policy's ``access`` section (env variables read); ``None`` without one."""


@dataclass
class _Source:
    """A policy file the service watches, and what its last reload attempt found."""

    path: Path
    name: str
    """Name of the policy it currently serves (the last good version's)."""
    digest: str
    """sha256 of the bytes last examined, valid or not (a changed digest triggers a reload)."""
    error: str | None = None
    reloads: int = 0


RETIRE_GRACE_S = 10.0
"""An engine no policy uses any more is stopped once idle and retired at least this long, so that
a request prepared just before a swap still finds its worker running."""

log = logging.getLogger(__name__)


class GuardService:
    """Serves one or more policies. Build with :meth:`from_policy_files`; close with :meth:`aclose`."""

    def __init__(self, policies: list[Policy], telemetry: Telemetry | None = None,
                 log_url: str | None = None) -> None:
        """``telemetry``: where traces, metrics and request log lines go (default: the global
        OpenTelemetry providers, no-op until an SDK is configured). ``log_url``: one log (a path or
        database URL) for every policy instead of each policy's own ``log`` target (``guard serve
        --log-url``, ``$GUARD_LOG_URL``: replicas and containers point all policies at one database)."""
        if not policies:
            raise PolicyError("<none>", ["no policy to serve"])
        names = [p.name for p in policies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PolicyError(str(policies[0].source_path), [f"two policies are named {d!r}" for d in dupes])
        self._engines: dict[tuple, tuple[Engine, EngineWorker]] = {}
        self._retired: list[tuple[float, Engine, EngineWorker]] = []
        self._stores: dict[str, LogStore] = {}
        """Open log stores by target (path or URL): policies naming the same log share one."""
        self._writers: dict[int, LogWriter] = {}
        """The writer thread of each store (by ``id(store)``): the engine never waits on the log."""
        self._served: dict[str, _Served] = {}
        self._log_url = log_url
        self._live: set[Callable[[GuardError], None]] = set()
        """One callback per running stream that ends it with an error event (:meth:`interrupt`)."""
        self._interrupting = False
        self._sources = [_Source(p.source_path, p.name, p.content_hash) for p in policies if p.source_path]
        self._started = time.time()
        self._closed = False
        self.telemetry = telemetry or Telemetry()
        try:
            for policy in policies:
                self._served[policy.name] = self._load(policy)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_policy_files(cls, paths: Sequence[str | Path], telemetry: Telemetry | None = None,
                          log_url: str | None = None) -> GuardService:
        return cls([load_policy(p) for p in paths], telemetry, log_url)

    # -- loading ------------------------------------------------------------------------------

    def _load(self, policy: Policy, created: int | None = None) -> _Served:
        keys = policy.access.resolve_keys(os.environ) if policy.access is not None else None
        engine, worker = self._engine_for(policy)
        monitors = [self._monitor(spec, policy, engine) for spec in policy.monitors]
        bt = policy.backtrack
        config = ControllerConfig(
            rollback=bt.rollback, rollback_tokens=bt.rollback_tokens, max_retries=bt.max_retries,
            safe_level=bt.safe_level, retry_threshold=bt.retry_threshold, garble_margin=bt.garble_margin,
            garble_window=bt.garble_window,
            refusal=bt.refusal, holdback_tokens=policy.stream.holdback_tokens,
            reset_marker=policy.stream.reset_marker, release_margin=policy.stream.release_margin,
            on_monitor_error=policy.on_monitor_error,
            strategies=tuple(Strategy(temperature=s.temperature, top_p=s.top_p, reseed=s.reseed,
                                      ban_first_token=s.ban_first_token, steer_alpha=s.steer_alpha,
                                      deliberate=s.deliberate)
                             for s in bt.strategies),
            deliberation=_deliberation(policy))
        # a path or URL; url_env read here, like access keys
        log_target = self._log_url or policy.log.target(os.environ)
        if log_target not in self._stores:
            store = self._stores[log_target] = LogStore.open(log_target)
            self._writers[id(store)] = LogWriter(store, name=f"guard-log-writer-{len(self._writers)}")
        return _Served(policy, engine, worker, monitors, config, self._stores[log_target],
                       created or int(time.time()), keys)

    def _engine_for(self, policy: Policy) -> tuple[Engine, EngineWorker]:
        spec = policy.model
        key = (spec.engine, str(Path(spec.path).resolve()), spec.dtype, spec.device, spec.max_context,
               spec.vllm.model_dump_json() if spec.vllm is not None else None)
        if key not in self._engines:
            engine: Engine
            if spec.engine == "vllm":
                from guard.engine.vllm_engine import VLLMEngine, VLLMOptions

                engine = VLLMEngine.load(spec.path, dtype=spec.dtype, name=spec.served_name,
                                         max_context=spec.max_context,
                                         options=spec.vllm.to_options() if spec.vllm else VLLMOptions())
            else:
                engine = TransformersEngine.load(spec.path, dtype=spec.dtype, device=spec.device,
                                                 name=spec.served_name, max_context=spec.max_context)
            self._engines[key] = (engine, EngineWorker(name=f"guard-engine-{len(self._engines)}"))
        return self._engines[key]

    @staticmethod
    def _monitor(spec, policy: Policy, engine: Engine) -> BoundMonitor:
        mon: Monitor
        if spec.kind == "probe":
            agg = spec.aggregation.to_spec() if spec.aggregation is not None else None
            mon = ProbeMonitor.load(spec.path, name=spec.name, layer=spec.layer, threshold=spec.threshold,
                                    aggregation=agg)
            mon.check_compatible(engine.info, policy.model.path)
            return BoundMonitor(mon, action=spec.action, scope=spec.scope)
        if spec.kind == "sae":
            return BoundMonitor(_sae_monitor(spec, engine), action=spec.action, scope=spec.scope)
        mon = ResetTokenMonitor.from_tokenizer(engine.tokenizer, spec.token, name=spec.name)
        # A model-native reset condemns everything it said before it: cut back to the response start.
        return BoundMonitor(mon, action=spec.action, rollback="response", scope=spec.scope)

    # -- hot reload ---------------------------------------------------------------------------

    def reload_changed(self) -> list[str]:
        """Reload every policy file whose bytes changed; return the names swapped in.

        Blocking (it may load a model): the server calls it in a thread. Never raises for a bad
        file: the error is logged and kept for :meth:`health` until a later edit fixes it.
        """
        swapped: list[str] = []
        for src in self._sources:
            if self._closed:
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
                if self._closed:  # the server is shutting down: swap nothing into a closed service
                    return swapped
                self._swap(src, policy)
            except Exception as exc:  # noqa: BLE001 - a bad edit must never take the server down
                src.error = str(exc) if isinstance(exc, GuardError) else f"{src.path}: {type(exc).__name__}: {exc}"
                log.error("policy %s not reloaded, still serving the last good version:\n%s", src.path, src.error)
                continue
            src.digest, src.error, src.reloads = policy.content_hash, None, src.reloads + 1
            swapped.append(policy.name)
            log.info("policy %s reloaded from %s (sha256 %s)", policy.name, src.path, policy.content_hash[:12])
        self._retire_unused()  # also engines loaded for an edit that then failed
        self._stop_retired()
        return swapped

    def _swap(self, src: _Source, policy: Policy) -> None:
        """Build ``policy`` (a new engine only if its model fields changed) and swap it in for ``src``."""
        other = next((s for s in self._sources if s is not src and s.name == policy.name), None)
        if other is not None:
            raise PolicyError(str(src.path), [(f"{src.path}: name: policy name {policy.name!r} is already served "
                                              f"from {other.path}")])
        old = self._served[src.name]
        new = self._load(policy, created=old.created if policy.name == src.name else None)
        self._served = {(policy.name if name == src.name else name): (new if name == src.name else s)
                        for name, s in self._served.items()}
        src.name = policy.name

    def _retire_unused(self) -> None:
        used = {id(s.engine) for s in self._served.values()}
        for key, (engine, worker) in list(self._engines.items()):
            if id(engine) not in used:
                del self._engines[key]
                self._retired.append((time.monotonic(), engine, worker))

    def _stop_retired(self) -> None:
        now, keep = time.monotonic(), []
        for since, engine, worker in self._retired:
            if worker.active == 0 and now - since >= RETIRE_GRACE_S:
                worker.stop()
                engine.close()
                log.info("stopped engine %s: no policy uses it any more", engine.info.name)
            else:
                keep.append((since, engine, worker))
        self._retired = keep

    # -- serving ------------------------------------------------------------------------------

    def list_models(self) -> list[ServedModel]:
        # root: this policy's own name for its model, never the shared engine's (which is named after
        # whichever policy loaded it first, possibly another tenant's).
        return [ServedModel(id=name, created=s.created, policy=name, root=s.policy.model.served_name or name)
                for name, s in self._served.items()]

    def key_bindings(self) -> dict[str, frozenset[str]]:
        """API key -> the policies that bind it (keys from ``access`` sections only)."""
        bindings: dict[str, set[str]] = {}
        for name, s in self._served.items():
            for key in s.api_keys or ():
                bindings.setdefault(key, set()).add(name)
        return {k: frozenset(v) for k, v in bindings.items()}

    # -- the log, for review --------------------------------------------------------------------

    def log_stores(self) -> list[LogStore]:
        """The distinct log stores of the served policies (one per log database), in policy order.

        A store only a replaced version of a policy wrote to is not among them."""
        stores: dict[int, LogStore] = {}
        for s in self._served.values():
            stores.setdefault(id(s.store), s.store)
        return list(stores.values())

    def find_log(self, log_id: str) -> tuple[LogStore, str]:
        """The store holding the record whose id is (or starts with) ``log_id``, and its full id.

        :class:`NotFoundError` if no store has it; :class:`InvalidRequestError` if a prefix matches
        records in several stores (within one store, ``resolve_id`` raises that itself)."""
        found = []
        for store in self.log_stores():
            try:
                found.append((store, store.resolve_id(log_id)))
            except NotFoundError:
                continue
        if not found:
            raise NotFoundError(f"no log record with id {log_id!r}", param="id", code="log_not_found")
        if len(found) > 1:
            raise InvalidRequestError(f"log id prefix {log_id!r} is ambiguous; give more characters", param="id")
        return found[0]

    def monitor_thresholds(self, policy_name: str, policy_hash: str) -> dict[str, float]:
        """Monitor -> threshold of the served policy ``policy_name``, if the version served now is
        ``policy_hash``; ``{}`` otherwise (the thresholds a record was judged by are then unknown)."""
        s = self._served.get(policy_name)
        if s is None or s.policy.content_hash != policy_hash:
            return {}
        return {b.monitor.name: b.monitor.threshold for b in s.monitors}

    def output_tokens(self, record: GenerationRecord) -> list[str] | None:
        """Each token of ``record.output_ids`` decoded on its own (special tokens spelled out), by a
        served tokenizer that reproduces ``record.final_text`` from them: the engine of the record's
        policy, else one named as its model. ``None`` when no served tokenizer does."""
        served = list(self._served.values())
        engines = [s.engine for s in served if s.policy.name == record.policy_name]
        engines += [s.engine for s in served if s.engine.info.name == record.model]
        for engine in {id(e): e for e in engines}.values():
            tok = engine.tokenizer
            if tok.decode(list(record.output_ids)) != record.final_text:
                continue
            one = getattr(tok, "token_text", None) or (lambda t, tok=tok: tok.decode([t]))
            return [one(t) for t in record.output_ids]
        return None

    def resolve(self, model: str, allowed: frozenset[str] | None = None) -> _Served:
        """The served policy ``model``; :class:`NotFoundError` if unknown or not in ``allowed``.

        A model the caller may not use is reported exactly like one that does not exist, so a
        tenant's key reveals nothing about other tenants' policies.
        """
        served = self._served
        visible = sorted(n for n in served if allowed is None or n in allowed)
        if model not in visible:
            raise NotFoundError(f"The model `{model}` does not exist or you do not have access to it. Served "
                                "models: " + (", ".join(visible) or "none"), param="model")
        return served[model]

    def prepare(self, req: GenerationRequest) -> PreparedGeneration:
        """Validate and tokenise ``req``; raises before anything is sent to the client."""
        served = self.resolve(req.model, req.allowed_models)
        info, tok = served.engine.info, served.engine.tokenizer
        _refuse_certainly_too_long(req, tok, info.context_length)
        if req.messages is not None:
            prompt_ids, param = tok.encode_chat(_chat_messages(served, req.messages)), "messages"
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

    async def stream(self, prepared: PreparedGeneration) -> AsyncGenerator[Event, None]:
        """Run one guarded generation; closing this iterator early cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        def end(err: GuardError) -> None:
            events.put_nowait(Failed(err))

        job = self._job(prepared, emit)
        job.group = prepared.request.group or prepared.request.request_id
        prepared.served.worker.submit(job)
        self._live.add(end)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            self._live.discard(end)
            job.cancelled = True

    def interrupt(self, err: GuardError) -> int:
        """End every running stream with ``err`` (an error event); return how many there were.

        Called on the event loop when a draining server's grace period is over. Each generation is
        then cancelled like one whose client left, and a flagged one is written to the log with
        outcome ``interrupted`` (its record as far as it got).
        """
        self._interrupting = True
        live = list(self._live)
        for end in live:
            end(err)
        return len(live)

    def _job(self, prepared: PreparedGeneration, emit) -> GuardedGeneration:
        served, req = prepared.served, prepared.request
        record = GenerationRecord(
            request_id=req.request_id, policy_name=served.policy.name, policy_hash=served.policy.content_hash,
            model=served.engine.info.name, messages=req.messages,
            prompt=req.prompt if isinstance(req.prompt, str) else None, prompt_tokens=len(prepared.prompt_ids))
        trace = self.telemetry.generation(record)  # the request span starts now, on the event loop
        log_writes = GenerationLogging(served.policy.log.keeps, self._writers[id(served.store)], trace.watch(emit))

        def on_finish(rec: GenerationRecord) -> str | None:
            if self._interrupting and rec.outcome == "cancelled":  # cut off by a drain, not by its client
                rec.outcome = "interrupted"
            return log_writes.finish(rec)

        return GuardedGeneration(served.engine, prepared.prompt_ids, prepared.params, served.monitors,
                                 served.config, record, log_writes.emit, on_finish, trace,
                                 on_checkpoint=log_writes.checkpoint, retracting=req.client_retracts)

    def health(self) -> dict[str, Any]:
        """Status per served policy, including the last reload error of its file (``None`` if fine)."""
        sources = {src.name: src for src in self._sources}
        engines = list(self._engines.values())
        workers = [w for _, w in engines] + [w for _, _, w in self._retired]

        def model(name: str, s: _Served) -> dict[str, Any]:
            src = sources.get(name)
            return {"id": name, "policy_hash": s.policy.content_hash, "engine": s.policy.model.engine,
                    "monitors": [b.monitor.name for b in s.monitors],
                    "source": str(src.path) if src else None, "reloads": src.reloads if src else 0,
                    "reload_error": src.error if src else None}

        return {
            "status": "ok",
            "uptime_s": round(time.time() - self._started, 1),
            "models": [model(n, s) for n, s in self._served.items()],
            "active_generations": sum(w.active for w in workers),
            "engine_stats": [dataclasses.asdict(e.stats) for e, _ in engines],
        }

    def close(self) -> None:
        self._closed = True
        for engine, worker in self._engines.values():
            worker.stop()
            engine.close()
        for _, engine, worker in self._retired:
            worker.stop()
            engine.close()
        self._retired.clear()
        for writer in self._writers.values():
            writer.close()  # what is queued is written first
        self._writers.clear()
        for store in self._stores.values():
            store.close()
        self._engines.clear()
        self._stores.clear()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


NORMALIZATION_SLACK = 4
"""How many input bytes one token may cover beyond its own spelling (a normalizer may contract
"ﬁ", 3 bytes, to "fi"): a generous factor keeps :func:`_refuse_certainly_too_long` a lower bound."""


def _refuse_certainly_too_long(req: GenerationRequest, tok, context_length: int) -> None:
    """ContextLengthError for a text prompt that cannot fit however it tokenises, without tokenising
    it (a huge prompt would hold the tokenizer, and the GIL, for seconds)."""
    per_token = getattr(tok, "max_token_bytes", None)
    if not per_token:
        return
    if req.messages is not None:
        texts, param = [m["content"] for m in req.messages if isinstance(m.get("content"), str)], "messages"
    elif isinstance(req.prompt, str):
        texts, param = [req.prompt], "prompt"
    else:
        return
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    at_least = size // (per_token * NORMALIZATION_SLACK)
    if at_least > context_length:
        raise ContextLengthError(f"This model's maximum context length is {context_length} tokens; the prompt has "
                                 f"{size} bytes of text, at least {at_least} tokens.", param=param)


def _deliberation(policy: Policy) -> DeliberationConfig | None:
    """The controller's deliberation settings; ``None`` when the policy never deliberates."""
    d = policy.deliberation
    if d.mode == "off" and not any(s.deliberate for s in policy.backtrack.strategies):
        return None
    return DeliberationConfig(mode=d.mode, spec=d.spec_text(), instruction=d.instruction, placement=d.placement,
                              open_tag=d.open_tag, close_tag=d.close_tag,
                              max_reasoning_tokens=d.max_reasoning_tokens, risk_monitor=d.risk_monitor)


def _chat_messages(served: _Served, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages the model sees: reasoning tags in client content broken (tags that are special
    tokens are neutralised by the tokenizer anyway), and the spec as a first system message for
    ``placement: system``."""
    d = served.config.deliberation
    if d is None:
        return messages
    tok = served.engine.tokenizer
    tags = tuple(t for t in (d.open_tag, d.close_tag) if tok.token_id(t) is None)
    out = [{**m, "content": neutralise_text(m["content"], tags)} if isinstance(m.get("content"), str) else m
           for m in messages]
    if d.placement == "system" and d.mode == "always":
        out.insert(0, {"role": "system", "content": system_prompt(d.instruction, d.spec)})
    return out


def _sae_monitor(spec, engine: Engine):
    """Build an SAE feature monitor from its policy spec and check it fits the engine's model."""
    from guard.sae.formats import load_sae
    from guard.sae.monitor import SaeFeatureMonitor, WatchedFeature

    sae = load_sae(spec.path, format=spec.format, layer=spec.layer)
    if sae.layer is None:
        raise ModelLoadError(f"SAE monitor '{spec.name}': {spec.path} names no hook point; set `layer:` in the "
                             "policy to the engine layer it was trained on")
    feats = [WatchedFeature(f.index, f.threshold, f.weight) for f in spec.features]
    agg = spec.aggregation.to_spec() if spec.aggregation is not None else None
    try:
        mon = SaeFeatureMonitor(spec.name, sae, feats, rule=spec.rule, weighted_threshold=spec.weighted_threshold,
                                aggregation=agg, topk_threshold=spec.topk_threshold)
    except ValueError as exc:
        raise ModelLoadError(f"SAE monitor '{spec.name}' ({spec.path}): {exc}") from exc
    mon.check_compatible(engine.info)
    return mon
