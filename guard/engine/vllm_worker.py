"""The half of the vLLM engine that runs inside vLLM's worker process, next to the model.

vLLM loads this module in its worker through ``worker_extension_cls``
(:class:`GuardWorkerExtension`) and ``logits_processors`` (:mod:`guard.engine.vllm_logits`); the
guard's front end (:mod:`guard.engine.vllm_engine`) talks to it with ``collective_rpc`` and with
per-request arguments in ``SamplingParams.extra_args["guard"]`` (:class:`RequestArgs`).

Per model forward (one scheduler step), with eager execution:

1. a pre-hook on the model reads the batch actually being run from the model runner
   (:class:`RunnerView`): which rows belong to which request and at which positions. Only
   requests that carry guard arguments are planned;
2. a hook on each monitored decoder layer reads the residual stream (block output = hidden +
   residual, as vLLM's Llama-style blocks return them), gathers the rows of the planned requests
   at positions ``>= score_from``, and scores them with every monitor of that layer in one batched
   call (:meth:`guard.monitors.base.Monitor.score`: pure tensor math). Steering vectors are added
   to the block output *after* the monitors read it, for the rows of the requests that asked;
   A monitor that raises or returns a non-finite score fails for the requests it was scoring:
   from then on it reports NaN with its failure bit for them and never acts for them, and vLLM's
   step goes on (the front end turns the bit into a monitor error for ``on_monitor_error``);
3. a post-hook on the model runs each request's monitor states (the same
   :class:`~guard.monitors.base.MonitorState` the controller uses, seeded with the accepted
   output's raw scores), appends one record per scored position to the request's score channel
   (:mod:`guard.engine.sidechannel`) and, when an acting monitor fires, marks the request so the
   logits processor forces the reset token for the token sampled in this same step.

Because records are written before the step's sampled tokens leave the worker, the front end
always finds the scores of token ``n`` once it has received token ``n + 1`` (the one-step lag).

Model runners are recognised by the attributes the guard reads (:func:`runner_kind`: the V1 runner
and its CPU subclass, Model Runner V2 and its CPU subclass); anything else raises at install time
rather than silently never calling the hooks.

Under vLLM's parallel serving (:class:`Layout`): with tensor parallelism every rank of a stage
holds the full residual stream after the all-reduce, runs the monitors and steers (each rank
samples from the gathered logits, so each must force the same reset), and only rank 0 writes the
score records; with pipeline parallelism a monitor runs on the stage that holds its layer, each
stage writes the records of its own monitors (NaN for the others) into the same channel, and the
front end merges them; only the last stage samples, so only a monitor whose layer it holds forces
the reset inside the step (the controller acts on the others' scores one token later, as it does
on the transformers engine).
"""

from __future__ import annotations

import logging
import math
import pickle
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from guard.engine.hooks import decoder_layers
from guard.engine.sidechannel import ScoreWriter, failed_bit
from guard.monitors.base import Monitor, MonitorState
from guard.positions import index

log = logging.getLogger(__name__)

ARGS_KEY = "guard"
"""Key of the guard's per-request arguments in ``SamplingParams.extra_args``."""


@dataclass(frozen=True)
class RequestArgs:
    """What one vLLM request asks of the worker (sent as a plain dict in ``extra_args``)."""

    key: str
    """Unique per vLLM request; names the score channel file."""
    channel: str
    """Path of the score channel file the worker appends to."""
    answer_start: int
    """Absolute position of answer token 0 (monitor-state positions are relative to it)."""
    score_from: int
    """Rows at absolute positions below this are not reported (already scored, or prompt)."""
    score: tuple[str, ...] = ()
    """Monitor keys whose raw scores are reported for every row at ``>= score_from``."""
    act: tuple[str, ...] = ()
    """Subset of ``score`` whose firing (aggregated score over threshold on an answer position)
    forces the reset token."""
    init: dict[str, list[float]] = field(default_factory=dict)
    """Monitor key -> raw scores of answer positions ``0..`` already accepted (seeds the state)."""
    steer: tuple[str, ...] = ()
    """Steering vector keys applied to rows at ``>= score_from``."""
    reset_id: int = -1
    start: int = 0
    """Length of the request's prompt (the sequence when it was submitted)."""
    ban_first: tuple[int, ...] = ()
    """Token ids banned for the first sampled token only."""
    ban: tuple[int, ...] = ()
    """Token ids banned for every sampled token."""
    scale: dict[str, float] = field(default_factory=dict)
    """Monitor key -> multiplier of its threshold (the controller's, after that monitor fired)."""

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "channel": self.channel, "answer_start": self.answer_start,
                "score_from": self.score_from, "score": list(self.score), "act": list(self.act),
                "init": self.init, "steer": list(self.steer), "reset_id": self.reset_id, "start": self.start,
                "ban_first": list(self.ban_first), "ban": list(self.ban), "scale": self.scale}

    @classmethod
    def from_extra_args(cls, extra: dict[str, Any] | None) -> RequestArgs | None:
        d = (extra or {}).get(ARGS_KEY)
        if d is None:
            return None
        return cls(key=d["key"], channel=d["channel"], answer_start=int(d["answer_start"]),
                   score_from=int(d["score_from"]), score=tuple(d.get("score", ())), act=tuple(d.get("act", ())),
                   init={k: list(v) for k, v in d.get("init", {}).items()}, steer=tuple(d.get("steer", ())),
                   reset_id=int(d.get("reset_id", -1)), start=int(d.get("start", 0)),
                   ban_first=tuple(d.get("ban_first", ())),
                   ban=tuple(d.get("ban", ())), scale={k: float(v) for k, v in d.get("scale", {}).items()})


@dataclass(frozen=True)
class Layout:
    """Where this worker sits in vLLM's parallel layout, and what it does for the guard there."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    layers: tuple[int, ...] = ()
    """Decoder layers this pipeline stage holds (all of them without pipeline parallelism)."""

    @property
    def reports(self) -> bool:
        """Whether this worker writes score records: tensor-parallel rank 0 of its stage. Every rank
        of the stage holds the same residual stream after the all-reduce and runs the monitors (each
        rank samples from the gathered logits, so each must force the same reset), but one writes."""
        return self.tp_rank == 0

    @property
    def last_stage(self) -> bool:
        """The stage that samples (and so can force the reset token)."""
        return self.pp_rank == self.pp_size - 1


def layout_of(model: Any) -> Layout:
    """This worker's :class:`Layout` (vLLM's process groups; one rank when there are none)."""
    blocks = decoder_layers(model)
    held = tuple(i for i, b in enumerate(blocks) if not _is_missing_layer(b))
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        tp, pp = get_tp_group(), get_pp_group()
        return Layout(tp.rank_in_group, tp.world_size, pp.rank_in_group, pp.world_size, held)
    except (ImportError, AssertionError):  # no process groups: a single worker
        return Layout(layers=held)


def _is_missing_layer(block: Any) -> bool:
    """A placeholder for a layer another pipeline stage holds (vLLM's ``PPMissingLayer``)."""
    return type(block).__name__ == "PPMissingLayer"


@dataclass
class _Live:
    """Worker-side state of one guarded request."""

    args: RequestArgs
    states: dict[str, MonitorState]
    writer: ScoreWriter | _NoWriter
    scores: dict[int, dict[str, float]] = field(default_factory=dict)
    """This step's scores: absolute position -> monitor key -> raw score."""
    failed: set[str] = field(default_factory=set)
    """Monitor keys that raised or returned a non-finite score for this request: from then on they
    report NaN with their failure bit and never act (the front end applies ``on_monitor_error``)."""


@dataclass
class _Planned:
    live: _Live
    rows: slice
    """Rows of this request in the flattened batch."""
    pos0: int
    """Absolute position of its first row."""


class WorkerState:
    """Everything the guard keeps in one worker process (one per process: :data:`STATE`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.monitors: dict[str, Monitor] = {}
        self.by_layer: dict[int, list[tuple[str, Monitor]]] = {}
        """Layer -> the installed monitors reading it, as ``(key, monitor)``."""
        self.steer: dict[str, tuple[int, torch.Tensor]] = {}
        self.live: dict[str, _Live] = {}
        """Guard request key -> state."""
        self.fired: set[str] = set()
        """Guard request keys whose next sampled token must be the reset token (read by the logits
        processor of the same step, then cleared)."""
        self.plan: list[_Planned] = []
        self.row_ids: torch.Tensor | None = None
        self.view: RunnerView | None = None
        self.layout = Layout()
        """Where this worker sits in vLLM's parallel layout (set by :func:`install`)."""
        self.hooked_layers: set[int] = set()
        self.handles: list[Any] = []
        self.calls = {"steps": 0, "layer_hooks": 0, "scored_rows": 0}
        """Counters that prove the hooks really ran (tests read them through collective_rpc)."""

    # -- configuration (collective_rpc) ---------------------------------------------------------

    def add_monitor(self, key: str, blob: bytes) -> None:
        monitor = pickle.loads(blob)
        if not isinstance(monitor, Monitor) or monitor.layer is None:
            raise TypeError(f"monitor {key!r} is not an activation monitor")
        self.monitors[key] = monitor
        self.by_layer.setdefault(monitor.layer, []).append((key, monitor))

    def add_steer(self, key: str, layer: int, vector: list[float]) -> None:
        self.steer[key] = (layer, torch.tensor(vector, dtype=torch.float32))

    # -- per step --------------------------------------------------------------------------------

    def begin_step(self, input_ids: torch.Tensor | None, positions: torch.Tensor) -> None:
        self.plan = []
        self.fired.clear()
        view = self.view
        if view is None:
            return
        self.calls["steps"] += 1
        batch = view.current()
        if batch is None:
            return
        req_ids, qsl, extra = batch
        live_keys = set()
        starts = positions[torch.as_tensor(qsl[:-1], dtype=torch.long)].tolist() if len(req_ids) else []
        for i, rid in enumerate(req_ids):
            args = extra(i, rid)
            if args is None:
                continue
            live = self.live.get(args.key)
            if live is None:
                live = self._open(args)
            live_keys.add(args.key)
            if qsl[i + 1] > qsl[i]:
                self.plan.append(_Planned(live, slice(int(qsl[i]), int(qsl[i + 1])), int(starts[i])))
        self.row_ids = input_ids
        self._close_finished(view.alive_keys())

    def _open(self, args: RequestArgs) -> _Live:
        states = {}
        for key in args.score:
            mon = self.monitors.get(key)
            if mon is None:
                raise KeyError(f"monitor {key!r} is not installed in this worker")
            st = mon.new_state()
            st.scale = args.scale.get(key, 1.0)
            if key in args.init:
                st.extend(0, args.init[key])
            states[key] = st
        # One writer per stage: the other tensor-parallel ranks compute the same records.
        writer = ScoreWriter(args.channel, list(args.score)) if self.layout.reports else _NoWriter()
        live = _Live(args, states, writer)
        self.live[args.key] = live
        return live

    def _close_finished(self, alive: set[str] | None) -> None:
        if alive is None:
            return
        for key in [k for k in self.live if k not in alive]:
            self.live.pop(key).writer.close()

    def on_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        """Score the planned rows at ``layer`` and steer; returns the new ``hidden`` if steered."""
        if not self.plan:
            return None
        self.calls["layer_hooks"] += 1
        stream = hidden if residual is None else hidden + residual
        mons = self.by_layer.get(layer)
        if mons:
            self._score_layer(layer, stream, mons)
        steered = None
        for p in self.plan:
            for skey in p.live.args.steer:
                s_layer, vec = self.steer[skey]
                if s_layer != layer:
                    continue
                lo = max(p.rows.start, p.rows.start + p.live.args.score_from - p.pos0)
                if lo >= p.rows.stop:
                    continue
                if steered is None:
                    steered = hidden.clone()
                steered[lo:p.rows.stop] += vec.to(steered.dtype).to(steered.device)
        return steered

    def _score_layer(self, layer: int, stream: torch.Tensor, mons: list[tuple[str, Monitor]]) -> None:
        index: list[int] = []
        owners: list[tuple[_Planned, int, int]] = []  # planned, first row offset in index, first position
        for p in self.plan:
            if not any(k in p.live.args.score for k, _ in mons):
                continue
            first = max(p.pos0, p.live.args.score_from)
            lo = p.rows.start + first - p.pos0
            if lo >= p.rows.stop:
                continue
            owners.append((p, len(index), first))
            index.extend(range(lo, p.rows.stop))
        if not index:
            return
        idx = torch.tensor(index, dtype=torch.long, device=stream.device)
        x = stream.index_select(0, idx).float()
        ids = self.row_ids.index_select(0, idx).tolist() if self.row_ids is not None else [0] * len(index)
        self.calls["scored_rows"] += len(index)
        for key, mon in mons:
            users = [o for o in owners if key in o[0].live.args.score]
            if not users:
                continue
            try:
                scores = mon.score(x, ids)
                error = None if len(scores) == len(index) else f"returned {len(scores)} scores for {len(index)} rows"
            except Exception as exc:  # a monitor bug must not take vLLM's step down
                log.exception("monitor %s failed in the vLLM worker", key)
                scores, error = [], f"{type(exc).__name__}: {exc}"
            for p, off, first in users:
                n = p.rows.stop - (p.rows.start + first - p.pos0)
                mine = [float(v) for v in scores[off:off + n]] if error is None else []
                if error is None and not all(math.isfinite(v) for v in mine):
                    log.error("monitor %s returned a non-finite score in the vLLM worker", key)
                    mine = []
                if key in p.live.failed or not mine:
                    p.live.failed.add(key)
                    mine = [math.nan] * n
                for j in range(n):
                    p.live.scores.setdefault(first + j, {})[key] = mine[j]

    def end_step(self) -> None:
        """Run monitor states, write the records, mark firings for the logits processor."""
        for p in self.plan:
            live = p.live
            if not live.scores:
                continue
            args = live.args
            positions = sorted(live.scores)
            forced = False
            for key in args.score:
                if key in live.failed:
                    continue
                st = live.states[key]
                answer = [(index(args.answer_start, q), live.scores[q][key]) for q in positions
                          if q >= args.answer_start and key in live.scores[q]]
                if not answer:
                    continue
                fire = st.extend(answer[0][0], [s for _, s in answer])
                if fire is not None and key in args.act:
                    forced = True
            last = positions[-1]
            failed = 0
            for i, k in enumerate(args.score):
                failed |= failed_bit(i) if k in live.failed else 0
            for q in positions:
                live.writer.write(q, [live.scores[q].get(k, float("nan")) for k in args.score],
                                  forced=forced and q == last, failed=failed)
            live.scores = {}
            if forced:
                self.fired.add(args.key)
        self.plan = []


class _NoWriter:
    """The score writer of a tensor-parallel rank other than 0 (its stage's rank 0 writes)."""

    def write(self, position: int, scores: list[float], forced: bool = False, failed: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


STATE = WorkerState()


class RunnerView:
    """Reads the batch being run from a model runner: ``current()`` gives
    ``(req_ids, query_start_loc, extra)`` where ``extra(i, req_id)`` returns that request's
    :class:`RequestArgs` or ``None``; ``alive_keys()`` the guard keys of requests still known to the
    runner (``None`` if unknown)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._args: dict[str, RequestArgs | None] = {}

    def current(self):
        batch = self.runner.input_batch
        n = batch.num_reqs
        if n == 0:
            return None
        req_ids = batch.req_ids[:n]
        qsl = self.runner.query_start_loc.np[:n + 1].copy()
        return req_ids, qsl, self._extra

    def _extra(self, i: int, rid: str) -> RequestArgs | None:
        if rid not in self._args:
            state = self.runner.requests.get(rid)
            sp = state.sampling_params if state is not None else None
            self._args[rid] = RequestArgs.from_extra_args(sp.extra_args if sp is not None else None)
        return self._args[rid]

    def alive_keys(self) -> set[str]:
        reqs = self.runner.requests
        for rid in [r for r in self._args if r not in reqs]:
            del self._args[rid]
        return {a.key for a in self._args.values() if a is not None}


class RunnerViewV2:
    """:class:`RunnerView` for Model Runner V2 (``vllm.v1.worker.gpu.model_runner``), which builds a
    fresh ``InputBatch`` per step: its ``prepare_inputs`` and ``add_requests`` are wrapped to keep the
    step's batch and each request's guard arguments. Written against vLLM 0.32's and 0.33's V2
    source (what it reads is in :data:`RUNNER_V2` and :data:`guard.engine.vllm_compat.NEEDS`, checked
    against that source by the tests); not run here (V2 needs Triton)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.batch = None
        self._args: dict[str, RequestArgs | None] = {}
        prepare, add = runner.prepare_inputs, runner.add_requests

        def prepare_inputs(*a, **kw):
            self.batch = prepare(*a, **kw)
            return self.batch

        def add_requests(scheduler_output):
            for new in scheduler_output.scheduled_new_reqs:
                sp = new.sampling_params
                self._args[new.req_id] = RequestArgs.from_extra_args(sp.extra_args if sp is not None else None)
            return add(scheduler_output)

        runner.prepare_inputs, runner.add_requests = prepare_inputs, add_requests

    def current(self):
        b = self.batch
        if b is None or b.num_reqs == 0:
            return None
        return list(b.req_ids[:b.num_reqs]), np.asarray(b.query_start_loc_np[:b.num_reqs + 1]).copy(), self._extra

    def _extra(self, i: int, rid: str) -> RequestArgs | None:
        return self._args.get(rid)

    def alive_keys(self) -> set[str]:
        live = self.runner.req_states.req_id_to_index
        for rid in [r for r in self._args if r not in live]:
            del self._args[rid]
        return {a.key for a in self._args.values() if a is not None}


KNOWN_RUNNERS = {"vllm.v1.worker.gpu_model_runner.GPUModelRunner": "v1",
                 "vllm.v1.worker.cpu_model_runner.CPUModelRunner": "v1",
                 "vllm.v1.worker.gpu.model_runner.GPUModelRunner": "v2",
                 "vllm.v1.worker.cpu.model_runner.CPUModelRunner": "v2"}
"""Runners read from vLLM's source (0.32, 0.33): V1 and its CPU subclass (run here), Model Runner
V2 and its CPU subclass (checked against the source). Informational: :func:`runner_kind` decides
by the attributes a runner has, so a subclass or a renamed runner with the same batch works."""

RUNNER_V1 = ("input_batch", "input_batch.req_ids", "input_batch.num_reqs", "query_start_loc",
             "query_start_loc.np", "requests", "get_model")
"""What :class:`RunnerView` reads of a V1 runner (``a.b``: attribute ``b`` of attribute ``a``)."""
RUNNER_V2 = ("req_states", "req_states.req_id_to_index", "prepare_inputs", "add_requests", "get_model")
"""What :class:`RunnerViewV2` reads of (and wraps on) a Model Runner V2."""


def _lacking(obj: Any, paths: tuple[str, ...]) -> list[str]:
    out = []
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part, _MISSING)
            if cur is _MISSING:
                out.append(path)
                break
    return out


_MISSING = object()


def runner_kind(runner: Any) -> str:
    """``"v2"`` or ``"v1"``: which batch layout the runner has, probed by attribute
    (:data:`RUNNER_V2`, :data:`RUNNER_V1`); RuntimeError naming what is missing otherwise."""
    v2 = _lacking(runner, RUNNER_V2)
    if not v2:
        return "v2"
    v1 = _lacking(runner, RUNNER_V1)
    if not v1:
        return "v1"
    name = f"{type(runner).__module__}.{type(runner).__name__}"
    raise RuntimeError(f"the guard cannot map batch rows to requests on vLLM model runner {name}: it has neither "
                       f"the V1 runner's batch (missing: {', '.join(v1)}) nor Model Runner V2's (missing: "
                       f"{', '.join(v2)})")


def install(runner: Any, layers: Iterable[int]) -> list[int]:
    """Hook the runner's model at those of ``layers`` this pipeline stage holds (idempotent per
    layer) and attach the batch view; returns the layers hooked here (a layer another stage holds
    is hooked there)."""
    kind = runner_kind(runner)
    model = runner.get_model()
    st = STATE
    if st.view is None:
        st.layout = layout_of(model)
        st.view = RunnerView(runner) if kind == "v1" else RunnerViewV2(runner)

        def pre(_mod, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
            st.begin_step(input_ids, positions)

        def post(_mod, _args, _out):
            st.end_step()

        st.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        st.handles.append(model.register_forward_hook(post))
    blocks = decoder_layers(model)
    here = []
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} out of range (model has {len(blocks)} layers)")
        if layer not in st.layout.layers:
            continue
        here.append(layer)
        if layer in st.hooked_layers:
            continue

        def hook(_mod, _args, out, layer=layer):
            if isinstance(out, tuple):
                new = st.on_layer(layer, out[0], out[1] if len(out) > 1 else None)
                return None if new is None else (new, *out[1:])
            new = st.on_layer(layer, out, None)
            return new

        st.handles.append(blocks[layer].register_forward_hook(hook))
        st.hooked_layers.add(layer)
    return here


def _pp_receive_buffers(runner: Any, layout: Layout) -> None:
    """vLLM's V1 runner allocates a later pipeline stage's receive buffers in its warm-up pass, which
    vLLM's CPU worker skips for eager execution with an explicit KV size (``VLLM_CPU_KVCACHE_SPACE``;
    seen on 0.32, same code in 0.33): the stage's first step then fails ``assert
    self.intermediate_tensors is not None``. Allocate them as the warm-up pass does."""
    if layout.pp_rank == 0 or getattr(runner, "intermediate_tensors", 0) is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)


class GuardWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods are collective_rpc targets
    (run on every worker: every tensor-parallel rank, pipeline stage and data-parallel engine)."""

    def guard_add_monitor(self, key: str, blob: bytes) -> list[int]:
        """Install a monitor; returns the layers of it this worker hooked (empty on a pipeline
        stage that does not hold its layer)."""
        STATE.add_monitor(key, blob)
        return install(self.model_runner, [STATE.monitors[key].layer])

    def guard_add_steer(self, key: str, layer: int, vector: list[float]) -> list[int]:
        STATE.add_steer(key, layer, vector)
        return install(self.model_runner, [layer])

    def guard_counters(self) -> dict[str, int]:
        return {**STATE.calls, "live": len(STATE.live), "monitors": len(STATE.monitors)}

    def guard_runner(self) -> str:
        r = self.model_runner
        return f"{type(r).__module__}.{type(r).__name__}:{runner_kind(r)}"

    def guard_layout(self) -> dict[str, Any]:
        """This worker's place in the parallel layout (:class:`Layout`) and whether it reports. Called
        once the engine is up."""
        lay = layout_of(self.model_runner.get_model())
        _pp_receive_buffers(self.model_runner, lay)
        return {"tp_rank": lay.tp_rank, "tp_size": lay.tp_size, "pp_rank": lay.pp_rank, "pp_size": lay.pp_size,
                "layers": list(lay.layers), "reports": lay.reports}
