"""The half of the vLLM engine that runs inside vLLM's worker process, next to the model.

vLLM loads this module in its worker through ``worker_extension_cls``
(:class:`GuardWorkerExtension`) and ``logits_processors`` (:mod:`guard.engine.vllm_logits`); the
guard's front end (:mod:`guard.engine.vllm_engine`) talks to it with ``collective_rpc`` and with
per-request arguments in ``SamplingParams.extra_args["guard"]`` (:class:`RequestArgs`).

Inside the model: when the worker's model runner has loaded the model, and before vLLM compiles
it, :func:`install` puts the registered custom op ``guard::layer`` (:func:`layer_op`) after every
decoder block, through a forward hook that dynamo traces into the graph. The op is opaque to the
compiler, so it runs on every forward, compiled or eager: it scores *all* rows of the block's
residual stream (block output = hidden + residual, as vLLM's Llama-style blocks return them) with
every monitor of that layer (:meth:`guard.monitors.base.Monitor.score_tensor`: pure tensor math)
into the layer's persistent score buffer, and adds this step's steering rows (a persistent
``[rows, vectors]`` coefficient buffer times the layer's vectors) to the block output, after the
monitors read it. Fixed buffers, no host sync, no branch on values: what CUDA graphs can capture.
A monitor that raises leaves NaN in its column (:attr:`WorkerState.op_errors` says why).

Around each forward, on the host (:func:`_wrap_step`):

1. before: read the batch actually being run from the model runner (:class:`RunnerView`): which
   rows belong to which request, and fill the steering coefficients of the requests that steer at
   positions ``>= score_from``. Only requests that carry guard arguments are planned;
2. after: copy back the score rows of the planned requests at positions ``>= score_from`` (padded
   and unguarded rows are never read), run each request's monitor states (the same
   :class:`~guard.monitors.base.MonitorState` the controller uses, seeded with the accepted
   output's raw scores), append one record per scored position to the request's score channel
   (:mod:`guard.engine.sidechannel`) and, when an acting monitor fires, mark the request so the
   logits processor forces the reset token for the token sampled in this same step. A monitor that
   raised or returned a non-finite score fails for the requests it was scoring: from then on it
   reports NaN with its failure bit for them and never acts for them, and vLLM's step goes on (the
   front end turns the bit into a monitor error for ``on_monitor_error``).

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
        return {
            "key": self.key,
            "channel": self.channel,
            "answer_start": self.answer_start,
            "score_from": self.score_from,
            "score": list(self.score),
            "act": list(self.act),
            "init": self.init,
            "steer": list(self.steer),
            "reset_id": self.reset_id,
            "start": self.start,
            "ban_first": list(self.ban_first),
            "ban": list(self.ban),
            "scale": self.scale,
        }

    @classmethod
    def from_extra_args(cls, extra: dict[str, Any] | None) -> RequestArgs | None:
        d = (extra or {}).get(ARGS_KEY)
        if d is None:
            return None
        return cls(
            key=d["key"],
            channel=d["channel"],
            answer_start=int(d["answer_start"]),
            score_from=int(d["score_from"]),
            score=tuple(d.get("score", ())),
            act=tuple(d.get("act", ())),
            init={k: list(v) for k, v in d.get("init", {}).items()},
            steer=tuple(d.get("steer", ())),
            reset_id=int(d.get("reset_id", -1)),
            start=int(d.get("start", 0)),
            ban_first=tuple(d.get("ban_first", ())),
            ban=tuple(d.get("ban", ())),
            scale={k: float(v) for k, v in d.get("scale", {}).items()},
        )


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
    failed: set[str] = field(default_factory=set)
    """Monitor keys that raised or returned a non-finite score for this request: from then on they
    report NaN with their failure bit and never act (the front end applies ``on_monitor_error``)."""


@dataclass
class _Planned:
    live: _Live
    rows: slice
    """Rows of this request in the flattened batch."""


class WorkerState:
    """Everything the guard keeps in one worker process (one per process: :data:`STATE`).

    Two halves meet here. Inside the model's forward (compiled or not), :meth:`run_layer` is the
    body of the ``guard::layer`` op: it scores *every* row with every monitor of the layer into
    the layer's persistent score buffer and adds the step's steering rows, reading nothing but
    tensors. Around the forward, on the host, :meth:`begin_step` plans which rows belong to which
    guarded request (and fills the steering coefficients) and :meth:`end_step` reads the buffers
    back for those rows only, runs the monitor states and writes the score channel.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.monitors: dict[str, Monitor] = {}
        self.by_layer: dict[int, list[tuple[str, Monitor]]] = {}
        """Layer -> the installed monitors reading it, as ``(key, monitor)``; a monitor's index in
        its layer's list is its column in that layer's score buffer."""
        self.column: dict[str, tuple[int, int]] = {}
        """Monitor key -> (layer, column of the layer's score buffer)."""
        self.buffers: dict[int, torch.Tensor] = {}
        """Layer -> ``[max_rows, monitors of the layer]`` float64 scores of the last forward's rows."""
        self.steer: dict[str, tuple[int, int]] = {}
        """Steering key -> (layer, index of its vector in the layer's steering matrix)."""
        self.steer_vectors: dict[int, torch.Tensor] = {}
        """Layer -> ``[vectors, d]`` steering matrix (float32, on the model's device)."""
        self.steer_coef: dict[int, torch.Tensor] = {}
        """Layer -> ``[max_rows, vectors]`` coefficients (0 or 1) of this step's rows."""
        self._coef_dirty: set[int] = set()
        self.live: dict[str, _Live] = {}
        """Guard request key -> state."""
        self.fired: set[str] = set()
        """Guard request keys whose next sampled token must be the reset token (read by the logits
        processor of the same step, then cleared)."""
        self.plan: list[_Planned] = []
        self.positions: torch.Tensor | None = None
        self._starts: list[int] | None = None
        self.op_errors: dict[str, str] = {}
        """Monitor key -> why it raised inside this forward's ``guard::layer`` op."""
        self.max_rows = 8192
        """Rows of the persistent buffers (the runner's ``max_num_tokens``, set at install)."""
        self.device = torch.device("cpu")
        self.view: RunnerView | RunnerViewV2 | None = None
        self.layout = Layout()
        """Where this worker sits in vLLM's parallel layout (set by :func:`install`)."""
        self.hooked_layers: set[int] = set()
        self.handles: list[Any] = []
        self.calls = {"steps": 0, "layer_hooks": 0, "scored_rows": 0}
        """Counters that prove the hooks really ran (tests read them through collective_rpc):
        ``layer_hooks`` counts executions of the ``guard::layer`` op, ``scored_rows`` the rows
        reported to guarded requests."""

    # -- configuration (collective_rpc) ---------------------------------------------------------

    def add_monitor(self, key: str, blob: bytes) -> None:
        monitor = pickle.loads(blob)
        if not isinstance(monitor, Monitor) or monitor.layer is None:
            raise TypeError(f"monitor {key!r} is not an activation monitor")
        if type(monitor).score_tensor is Monitor.score_tensor:
            raise TypeError(
                f"monitor {key!r} ({type(monitor).__name__}) has no score_tensor: vLLM's worker "
                "scores inside the model's graph, which needs tensor-in, tensor-out scoring"
            )
        mons = self.by_layer.setdefault(monitor.layer, [])
        self.monitors[key] = monitor
        self.column[key] = (monitor.layer, len(mons))
        mons.append((key, monitor))
        self.buffers[monitor.layer] = _grown(
            self.buffers.get(monitor.layer),
            self.max_rows,
            len(mons),
            torch.float64,
            self.device,
            math.nan,
        )

    def add_steer(self, key: str, layer: int, vector: list[float]) -> None:
        old = self.steer_vectors.get(layer)
        vec = torch.tensor([vector], dtype=torch.float32, device=self.device)
        self.steer_vectors[layer] = vec if old is None else torch.cat([old, vec])
        self.steer[key] = (layer, self.steer_vectors[layer].shape[0] - 1)
        self.steer_coef[layer] = _grown(
            self.steer_coef.get(layer),
            self.max_rows,
            self.steer_vectors[layer].shape[0],
            torch.float32,
            self.device,
            0.0,
        )

    # -- inside the forward (the body of the guard::layer op) ------------------------------------

    def run_layer(
        self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """Score all rows of ``layer``'s residual stream (``hidden + residual``, as vLLM's
        Llama-style blocks return them) into its buffer; return the block output ``hidden`` with
        this step's steering added (a new tensor: the op's output may not alias its input).

        Tensor math on persistent buffers only: no host sync and no branch on data, so the same
        body is captured by CUDA graphs. Padded rows are scored too and never read. A monitor that
        raises fills its column with NaN and is recorded in :attr:`op_errors`."""
        self.calls["layer_hooks"] += 1
        mons = self.by_layer.get(layer)
        if mons:
            stream = hidden if residual is None else hidden + residual
            self._score_rows(layer, stream, mons)
        coef = self.steer_coef.get(layer)
        if coef is None:
            return hidden.clone()
        n = hidden.shape[0]
        return hidden + (coef[:n] @ self.steer_vectors[layer]).to(hidden.dtype)

    def _score_rows(
        self, layer: int, stream: torch.Tensor, mons: list[tuple[str, Monitor]]
    ) -> None:
        n = stream.shape[0]
        buf = self.buffers[layer]
        if n > buf.shape[0]:  # more rows than the runner said it would run (eager only)
            buf = self.buffers[layer] = _grown(
                buf, n, buf.shape[1], torch.float64, buf.device, math.nan
            )
        x = stream.float()
        for col, (key, mon) in enumerate(mons):
            try:
                buf[:n, col] = mon.score_tensor(x)
            except Exception as exc:  # noqa: BLE001 - a monitor bug must not take vLLM's step down
                self.op_errors[key] = f"{type(exc).__name__}: {exc}"
                buf[:n, col] = math.nan

    # -- around the forward (host) ---------------------------------------------------------------

    def begin_step(self, positions: torch.Tensor | None) -> None:
        """Plan the rows of the guarded requests of the batch about to run; set their steering."""
        self.plan = []
        self.fired.clear()
        self.op_errors = {}
        self.positions, self._starts = positions, None
        view = self.view
        if view is None:
            return
        self.calls["steps"] += 1
        batch = view.current()
        if batch is None:
            return
        req_ids, qsl, extra = batch
        for i, rid in enumerate(req_ids):
            args = extra(i, rid)
            if args is None:
                continue
            live = self.live.get(args.key)
            if live is None:
                live = self._open(args)
            if qsl[i + 1] > qsl[i]:
                self.plan.append(_Planned(live, slice(int(qsl[i]), int(qsl[i + 1]))))
        self._set_steering()
        self._close_finished(view.alive_keys())

    def _row_starts(self) -> list[int]:
        """Absolute position of each planned request's first row (one small device read)."""
        if self._starts is None:
            positions = self.positions
            if self.plan and positions is None:
                raise RuntimeError("vLLM's model forward was called without positions")
            first = torch.as_tensor([p.rows.start for p in self.plan], dtype=torch.long)
            self._starts = (
                positions[first.to(positions.device)].tolist() if positions is not None else []
            )
        return self._starts

    def _set_steering(self) -> None:
        """Coefficient 1 for (row, vector) where the row's request steers with that vector at a
        position ``>= score_from``; 0 elsewhere."""
        wanted = [p for p in self.plan if p.live.args.steer]
        if not wanted and not self._coef_dirty:
            return
        host = {
            layer: torch.zeros(c.shape)
            for layer, c in self.steer_coef.items()
            if layer in self._coef_dirty
        }
        starts = (
            dict(zip((id(p) for p in self.plan), self._row_starts(), strict=True)) if wanted else {}
        )
        for p in wanted:
            lo = p.rows.start + max(0, p.live.args.score_from - starts[id(p)])
            for skey in p.live.args.steer:
                layer, j = self.steer[skey]
                if layer not in host:
                    host[layer] = torch.zeros(self.steer_coef[layer].shape)
                host[layer][lo : p.rows.stop, j] = 1.0
        for layer, h in host.items():
            self.steer_coef[layer].copy_(h, non_blocking=True)
        self._coef_dirty = {layer for layer in host if wanted}

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

    def end_step(self) -> None:
        """Read the planned rows' scores back, run monitor states, write the records, mark firings
        for the logits processor."""
        plan = self.plan
        scoring = [p for p in plan if p.live.args.score]
        if not scoring:
            self.plan = []
            return
        starts = self._row_starts()
        self.plan = []
        layers = {
            self.column[k][0] for p in scoring for k in p.live.args.score
        } & self.hooked_layers
        rows = max(p.rows.stop for p in scoring)
        host = {layer: self.buffers[layer][:rows].cpu().numpy() for layer in layers}
        for p, pos0 in zip(plan, starts, strict=True):
            if p.live.args.score:
                self._report(p, pos0, host)

    def _report(self, p: _Planned, pos0: int, host: dict[int, np.ndarray]) -> None:
        """Records of one request's reported rows. Only monitors whose layer this worker holds
        (``host``) score, fail or act here; the others read NaN (a pipeline stage that does not hold
        a monitor's layer leaves it to the stage that does) and no record is written without one."""
        live, args = p.live, p.live.args
        here = [k for k in args.score if self.column[k][0] in host]
        if not here:
            return
        newly = [k for k in here if k in self.op_errors and k not in live.failed]
        for k in newly:
            log.error("monitor %s failed in the vLLM worker: %s", k, self.op_errors[k])
        live.failed.update(newly)
        first = max(pos0, args.score_from)
        lo = p.rows.start + first - pos0
        if lo >= p.rows.stop:
            return
        scores = np.full((p.rows.stop - lo, len(args.score)), math.nan)
        for i, k in enumerate(args.score):
            if k not in here:
                continue
            layer, col = self.column[k]
            scores[:, i] = host[layer][lo : p.rows.stop, col]
            if k not in live.failed and not np.isfinite(scores[:, i]).all():
                log.error("monitor %s returned a non-finite score in the vLLM worker", k)
                live.failed.add(k)
            if k in live.failed:
                scores[:, i] = math.nan
        self.calls["scored_rows"] += len(scores)
        forced = False
        a0 = max(first, args.answer_start)  # first answer position among the reported rows
        for i, k in enumerate(args.score):
            if k in live.failed or k not in here or a0 >= first + len(scores):
                continue
            fire = live.states[k].extend(
                index(args.answer_start, a0), scores[a0 - first :, i].tolist()
            )
            forced = forced or (fire is not None and k in args.act)
        failed = 0
        for i, k in enumerate(args.score):
            failed |= failed_bit(i) if k in live.failed else 0
        last = len(scores) - 1
        for j, row in enumerate(scores.tolist()):
            live.writer.write(first + j, row, forced=forced and j == last, failed=failed)
        if forced:
            self.fired.add(args.key)


def _grown(
    old: torch.Tensor | None,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    fill: float,
) -> torch.Tensor:
    """A ``[rows, cols]`` buffer holding ``old``'s columns (a monitor or vector added after install)."""
    new = torch.full((rows, cols), fill, dtype=dtype, device=device)
    if old is not None:
        new[: min(rows, old.shape[0]), : old.shape[1]] = old[:rows]
    return new


class _NoWriter:
    """The score writer of a tensor-parallel rank other than 0 (its stage's rank 0 writes)."""

    def write(
        self, position: int, scores: list[float], forced: bool = False, failed: int = 0
    ) -> None:
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
        qsl = self.runner.query_start_loc.np[: n + 1].copy()
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
                self._args[new.req_id] = RequestArgs.from_extra_args(
                    sp.extra_args if sp is not None else None
                )
            return add(scheduler_output)

        runner.prepare_inputs, runner.add_requests = prepare_inputs, add_requests

    def current(self):
        b = self.batch
        if b is None or b.num_reqs == 0:
            return None
        return (
            list(b.req_ids[: b.num_reqs]),
            np.asarray(b.query_start_loc_np[: b.num_reqs + 1]).copy(),
            self._extra,
        )

    def _extra(self, i: int, rid: str) -> RequestArgs | None:
        return self._args.get(rid)

    def alive_keys(self) -> set[str]:
        live = self.runner.req_states.req_id_to_index
        for rid in [r for r in self._args if r not in live]:
            del self._args[rid]
        return {a.key for a in self._args.values() if a is not None}


KNOWN_RUNNERS = {
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner": "v1",
    "vllm.v1.worker.cpu_model_runner.CPUModelRunner": "v1",
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner": "v2",
    "vllm.v1.worker.cpu.model_runner.CPUModelRunner": "v2",
}
"""Runners read from vLLM's source (0.32, 0.33): V1 and its CPU subclass (run here), Model Runner
V2 and its CPU subclass (checked against the source). Informational: :func:`runner_kind` decides
by the attributes a runner has, so a subclass or a renamed runner with the same batch works."""

RUNNER_V1 = (
    "input_batch",
    "input_batch.req_ids",
    "input_batch.num_reqs",
    "query_start_loc",
    "query_start_loc.np",
    "requests",
    "get_model",
)
"""What :class:`RunnerView` reads of a V1 runner (``a.b``: attribute ``b`` of attribute ``a``)."""
RUNNER_V2 = (
    "req_states",
    "req_states.req_id_to_index",
    "prepare_inputs",
    "add_requests",
    "get_model",
)
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
    raise RuntimeError(
        f"the guard cannot map batch rows to requests on vLLM model runner {name}: it has neither "
        f"the V1 runner's batch (missing: {', '.join(v1)}) nor Model Runner V2's (missing: "
        f"{', '.join(v2)})"
    )


@torch.library.custom_op("guard::layer", mutates_args=())
def layer_op(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> torch.Tensor:
    """The guard's op after decoder block ``layer``: :meth:`WorkerState.run_layer` of :data:`STATE`.

    Opaque to torch.compile (dynamo records one call; inductor calls it as an extern kernel), so
    the monitors and steering vectors installed when it runs are the ones applied. Its output
    replaces the block's hidden output, which keeps the op in the graph."""
    return STATE.run_layer(layer, hidden, residual)


@layer_op.register_fake
def _layer_op_fake(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


def _layer_hook(layer: int):
    def hook(_mod, _args, out):
        if isinstance(out, tuple):
            return (layer_op(out[0], out[1] if len(out) > 1 else None, layer), *out[1:])
        return layer_op(out, None, layer)

    return hook


def install(runner: Any, layers: Iterable[int] | None = None) -> list[int]:
    """Put the ``guard::layer`` op after each decoder block in ``layers`` (all when ``None``;
    idempotent per layer) and wrap the runner's forward with the host-side step.

    Runs right after the runner loaded the model (:class:`GuardWorkerExtension`), before vLLM
    compiles it, so dynamo traces the hooks into the graph; a hook added after the compile would
    never run, which :meth:`GuardWorkerExtension.guard_add_monitor` refuses. Returns the layers
    of ``layers`` hooked here (a layer another pipeline stage holds is hooked there)."""
    kind = runner_kind(runner)
    model = runner.get_model()
    st = STATE
    if st.view is None:
        st.layout = layout_of(model)
        st.view = RunnerView(runner) if kind == "v1" else RunnerViewV2(runner)
        st.max_rows = int(getattr(runner, "max_num_tokens", st.max_rows))
        param = next(model.parameters(), None)
        st.device = st.device if param is None else param.device
        _wrap_step(runner, model, kind)
    blocks = decoder_layers(model)
    for layer in range(len(blocks)) if layers is None else layers:
        if layer in st.hooked_layers:
            continue
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} out of range (model has {len(blocks)} layers)")
        if layer not in st.layout.layers:  # held by another pipeline stage
            continue
        st.handles.append(blocks[layer].register_forward_hook(_layer_hook(layer)))
        st.hooked_layers.add(layer)
    return sorted(st.hooked_layers & set(range(len(blocks)) if layers is None else layers))


def _wrap_step(runner: Any, model: Any, kind: str) -> None:
    """Run :meth:`WorkerState.begin_step` before and :meth:`WorkerState.end_step` after each
    forward of a scheduled batch, on the host: around the V1 runner's ``_model_forward`` (called
    for every batch, whatever replays the graph: a full CUDA graph runs no module hook), or, for
    runners without it, as hooks on the (uncompiled) outer model."""
    st = STATE
    forward = getattr(runner, "_model_forward", None) if kind == "v1" else None
    if forward is not None:

        def model_forward(*args, **kwargs):
            st.begin_step(kwargs.get("positions", args[1] if len(args) > 1 else None))
            out = forward(*args, **kwargs)
            st.end_step()
            return out

        runner._model_forward = model_forward
        return

    def pre(_mod, args, kwargs):
        st.begin_step(kwargs.get("positions", args[1] if len(args) > 1 else None))

    def post(_mod, _args, _out):
        st.end_step()

    st.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    st.handles.append(model.register_forward_hook(post))


def _pp_receive_buffers(runner: Any, layout: Layout) -> None:
    """vLLM's V1 runner allocates a later pipeline stage's receive buffers in its warm-up pass, which
    vLLM's CPU worker skips for eager execution with an explicit KV size (``VLLM_CPU_KVCACHE_SPACE``;
    seen on 0.32, same code in 0.33): the stage's first step then fails ``assert
    self.intermediate_tensors is not None``. Allocate them as the warm-up pass does."""
    if layout.pp_rank == 0 or getattr(runner, "intermediate_tensors", 0) is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
    )


class GuardWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods are collective_rpc targets
    (run on every worker: every tensor-parallel rank, pipeline stage and data-parallel engine).

    vLLM 0.32 has no extension callback between loading the model and compiling it, so the
    extension sees the model runner being assigned (``model_runner`` is a data descriptor here,
    which takes precedence over the worker's instance attribute) and wraps that runner's
    ``load_model`` so :func:`install` runs right after it."""

    vllm_config: Any
    """The worker's (this class is mixed into vLLM's worker)."""

    @property
    def model_runner(self):
        try:
            return self.__dict__["_guard_model_runner"]
        except KeyError:
            raise AttributeError("model_runner") from None

    @model_runner.setter
    def model_runner(self, runner) -> None:
        self.__dict__["_guard_model_runner"] = runner
        if runner is None:  # the worker's __init__, before the device is set up
            return
        load = runner.load_model

        def load_model(*args, **kwargs):
            out = load(*args, **kwargs)
            install(runner)
            return out

        runner.load_model = load_model

    def guard_add_monitor(self, key: str, blob: bytes) -> list[int]:
        """Install a monitor; returns the layers of it this worker hooked (empty on a pipeline
        stage that does not hold its layer)."""
        STATE.add_monitor(key, blob)
        layer = STATE.monitors[key].layer
        if layer is None:
            raise ValueError(
                f"monitor {key!r} reads no layer: only activation monitors run in the vLLM worker"
            )
        return _hooked_here(self.model_runner, layer)

    def guard_add_steer(self, key: str, layer: int, vector: list[float]) -> list[int]:
        here = _hooked_here(self.model_runner, layer)
        STATE.add_steer(key, layer, vector)
        return here

    def guard_counters(self) -> dict[str, int]:
        return {**STATE.calls, "live": len(STATE.live), "monitors": len(STATE.monitors)}

    def guard_compilation(self) -> dict[str, str]:
        """How vLLM runs the model here: compilation mode, backend and CUDA graph mode."""
        c = self.vllm_config.compilation_config
        return {
            "mode": getattr(c.mode, "name", str(c.mode)),
            "backend": str(c.backend),
            "cudagraph_mode": getattr(c.cudagraph_mode, "name", str(c.cudagraph_mode)),
        }

    def guard_runner(self) -> str:
        r = self.model_runner
        return f"{type(r).__module__}.{type(r).__name__}:{runner_kind(r)}"

    def guard_layout(self) -> dict[str, Any]:
        """This worker's place in the parallel layout (:class:`Layout`) and whether it reports. Called
        once the engine is up."""
        lay = layout_of(self.model_runner.get_model())
        _pp_receive_buffers(self.model_runner, lay)
        return {
            "tp_rank": lay.tp_rank,
            "tp_size": lay.tp_size,
            "pp_rank": lay.pp_rank,
            "pp_size": lay.pp_size,
            "layers": list(lay.layers),
            "reports": lay.reports,
        }


def _hooked_here(runner: Any, layer: int) -> list[int]:
    """``[layer]`` if this worker's op reads it, ``[]`` if another pipeline stage holds it;
    RuntimeError if it is held here but has no op (it would never run in the compiled graph)."""
    if STATE.view is None:
        raise RuntimeError(
            "the guard's ops are not installed in this worker: GuardWorkerExtension installs "
            "them when vLLM's model runner loads the model"
        )
    blocks = decoder_layers(runner.get_model())
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range (model has {len(blocks)} layers)")
    if layer not in STATE.layout.layers:  # held by another pipeline stage
        return []
    if layer not in STATE.hooked_layers:
        raise RuntimeError(
            f"layer {layer} has no guard op: the guard installs its ops when vLLM loads the "
            "model (before compiling it), and this worker has none there"
        )
    return [layer]
