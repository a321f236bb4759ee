"""vLLM's parallel layout as the guard sees it: which stage holds a monitor's layer, who reports.

vLLM splits a model three ways (policy ``model.vllm``: ``tensor_parallel_size``,
``pipeline_parallel_size``, ``data_parallel_size``); the guard follows its layout rather than
choosing one:

- tensor parallel: every rank of a stage holds the full residual stream after the all-reduce. All
  ranks run the monitors and steer; rank 0 of each stage writes the score records;
- pipeline parallel: stage ``s`` holds decoder layers ``[start, end)`` (:func:`stage_layers`, vLLM's
  own split); a monitor runs on the stage holding its layer; stages write into the same per-request
  channel and the front end merges their records;
- data parallel: several engine cores, each with its own workers and requests; every worker gets
  every monitor (``collective_rpc`` reaches all engines) and writes its own requests' channels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from guard.errors import ModelLoadError

log = logging.getLogger(__name__)


def stage_layers(num_layers: int, pp_size: int) -> list[range]:
    """The decoder layers each pipeline stage holds, as vLLM splits them
    (``vllm.distributed.utils.get_pp_indices``: that function when vLLM is installed, which also
    honours ``VLLM_PP_LAYER_PARTITION``; otherwise its default rule: an even split, the remainder
    going to the stages before the last)."""
    if pp_size < 1 or num_layers < pp_size:
        raise ValueError(f"cannot split {num_layers} layers into {pp_size} pipeline stages")
    try:
        from vllm.distributed.utils import get_pp_indices
    except ImportError:
        get_pp_indices = _pp_indices
    return [range(*get_pp_indices(num_layers, rank, pp_size)) for rank in range(pp_size)]


def _pp_indices(num_hidden_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    parts = [num_hidden_layers // pp_size] * pp_size
    for i in range(2, num_hidden_layers % pp_size + 2):
        parts[-i] += 1
    start = sum(parts[:pp_rank])
    return start, start + parts[pp_rank]


def stage_of(layer: int, stages: Sequence[range]) -> int:
    """The pipeline stage holding ``layer``."""
    for s, layers in enumerate(stages):
        if layer in layers:
            return s
    raise ValueError(
        f"layer {layer} is on no pipeline stage ({[f'{r.start}-{r.stop - 1}' for r in stages]})"
    )


def bind_cpu_threads(world_size: int) -> None:
    """On CPU, vLLM binds each worker's OpenMP threads to cores and, unless told which
    (``VLLM_CPU_OMP_THREADS_BIND``), wants one NUMA node per worker, which a one-node machine lacks.
    When the variable is unset, give each of the ``world_size`` workers an equal contiguous share of
    the cores this process may use (``0-3|4-7``)."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < world_size:
        raise ModelLoadError(
            f"vLLM on CPU needs a core per worker: {world_size} workers (tensor x pipeline x "
            f"data parallel) but {len(cores)} cores"
        )
    share = len(cores) // world_size
    lists = [cores[i * share : (i + 1) * share] for i in range(world_size)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, c)) for c in lists)
    log.info("vLLM CPU workers bound to cores %s", os.environ["VLLM_CPU_OMP_THREADS_BIND"])


def describe_layout(workers: Sequence[Mapping[str, Any]]) -> str:
    """One line for the workers' ``guard_layout`` answers (of one data-parallel engine)."""
    parts = []
    for w in workers:
        layers = w["layers"]
        span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
        parts.append(
            f"pp {w['pp_rank']}/{w['pp_size']} tp {w['tp_rank']}/{w['tp_size']} {span}"
            f"{' (reports)' if w['reports'] else ''}"
        )
    return "; ".join(parts)


def layout_lines(
    num_layers: int, tp: int, pp: int, dp: int, monitors: Sequence[tuple[str, int]]
) -> list[str]:
    """What ``guard policy check`` prints about the parallel layout of a vLLM policy:
    ``monitors`` are ``(name, layer)`` of its activation monitors."""
    lines = [
        f"# vllm parallel layout: tensor {tp} x pipeline {pp} x data {dp} = {tp * pp * dp} worker(s)"
    ]
    if pp > 1:
        stages = stage_layers(num_layers, pp)
        lines += [f"#   stage {s}: layers {r.start}-{r.stop - 1}" for s, r in enumerate(stages)]
    else:
        stages = [range(num_layers)]
    for name, layer in monitors:
        s = stage_of(layer, stages)
        where = f"stage {s}, " if pp > 1 else ""
        who = (
            "scored on every tensor-parallel rank, reported by rank 0"
            if tp > 1
            else "scored and reported"
        )
        force = (
            ""
            if s == len(stages) - 1
            else "; not on the sampling stage: the controller, not the worker, stops the request when it fires"
        )
        lines.append(f"#   monitor {name} (layer {layer}): {where}{who}{force}")
    if dp > 1:
        lines.append(
            f"#   {dp} engine cores: every one gets every monitor and serves its own requests"
        )
    return lines
