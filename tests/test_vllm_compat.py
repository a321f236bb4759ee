"""Which vLLM the guard accepts: by feature (vllm_compat.NEEDS), checked live against the installed
vLLM (0.32 CPU) and statically against vLLM 0.33's source (its CUDA wheel, which cannot run here:
it pins torch 2.14 and Model Runner V2 needs Triton).

vLLM 0.33's wheel comes from the package registry through pip (``pip download vllm==0.33.0
--no-deps``, 336 MB: 17 s here uncached, on a loaded machine) into a cache directory (``$GUARD_TEST_CACHE``, default
``~/.cache/guard-tests``) and is read member by member with ``zipfile``: nothing is unpacked and no
vLLM code enters the repository. Without the registry the 0.33 tests skip, except under
``GUARD_TEST_REQUIRE_VLLM=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from guard.engine import vllm_worker
from guard.engine.vllm_compat import (
    NEEDS,
    Need,
    missing_in_source,
    missing_live,
    source_reader,
)
from guard.engine.vllm_worker import (
    RUNNER_V1,
    RUNNER_V2,
    Layout,
    RequestArgs,
    RunnerViewV2,
    WorkerState,
)

VLLM_033 = "0.33.0"
REQUIRE = os.environ.get("GUARD_TEST_REQUIRE_VLLM") == "1"


@pytest.fixture(scope="module")
def vllm033() -> zipfile.ZipFile:
    """vLLM 0.33.0's wheel, from pip's registry into a cache (once per machine)."""
    cache = (
        Path(os.environ.get("GUARD_TEST_CACHE", Path.home() / ".cache" / "guard-tests"))
        / f"vllm-{VLLM_033}"
    )
    wheels = sorted(cache.glob(f"vllm-{VLLM_033}-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"vllm=={VLLM_033}",
                "--no-deps",
                "--only-binary",
                ":all:",
                "-d",
                str(cache),
                "-q",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = sorted(cache.glob(f"vllm-{VLLM_033}-*.whl"))
        if not wheels:
            msg = f"cannot download vllm=={VLLM_033} from the registry: {run.stderr.strip()[-500:]}"
            if REQUIRE:
                pytest.fail(msg)
            pytest.skip(msg)
    with zipfile.ZipFile(wheels[-1]) as zf:
        yield zf


def _wheel_reader(zf: zipfile.ZipFile):
    names = set(zf.namelist())

    def read(rel: str) -> str | None:
        return zf.read(rel).decode() if rel in names else None

    return read


def _installed_vllm() -> Path:
    vllm = (
        pytest.importorskip("vllm", reason="vLLM is not installed")
        if not REQUIRE
        else __import__("vllm")
    )
    return Path(vllm.__file__).parent.parent


# -- the table against real vLLM ------------------------------------------------------------------


def test_the_installed_vllm_has_every_front_end_feature():
    _installed_vllm()
    assert missing_live(where=lambda w: w in ("front", "front_v2")) == []


def test_the_installed_vllm_source_has_every_feature():
    assert missing_in_source(source_reader(_installed_vllm())) == []


def test_vllm_033_source_has_every_feature(vllm033):
    assert missing_in_source(_wheel_reader(vllm033)) == []


def test_vllm_033_runs_model_runner_v2_by_default_and_v1_without_triton(vllm033):
    """Why both runners matter: 0.33 picks V2 unless Triton is missing or a feature forces V1."""
    src = vllm033.read("vllm/config/vllm.py").decode()
    body = src[src.index("def use_v2_model_runner") :]
    body = body[: body.index("\n    def ", 10)]
    assert (
        "VLLM_USE_V2_MODEL_RUNNER" in body
        and "HAS_TRITON" in body
        and body.rstrip().endswith("return True")
    )


def test_vllm_033_worker_extension_is_mixed_in_by_worker_extension_cls(vllm033):
    src = vllm033.read("vllm/v1/worker/worker_base.py").decode()
    assert "worker_extension_cls" in src and "init_worker_extension" in src


def test_the_runner_probes_are_in_the_needs_checked_against_source():
    """What runner_kind probes on a live runner is what the source checks hold vLLM to."""

    def members(module: str, name: str) -> set[str]:
        return {m for n in NEEDS if n.module == module and n.name == name for m in n.members}

    v1 = members("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
    v2 = members("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")
    assert {p.split(".")[0] for p in RUNNER_V1} <= v1
    assert {p.split(".")[0] for p in RUNNER_V2} <= v2
    assert "req_id_to_index" in members("vllm.v1.worker.gpu.states", "RequestState")
    assert {"req_ids", "num_reqs"} <= members("vllm.v1.worker.gpu_input_batch", "InputBatch")


def test_a_missing_feature_is_named(vllm033):
    """The static check can fail: 0.33's SamplingParams without extra_args is reported."""
    read = _wheel_reader(vllm033)

    def without_extra_args(rel: str) -> str | None:
        text = read(rel)
        return (
            text.replace("extra_args", "other_args") if rel == "vllm/sampling_params.py" else text
        )

    assert missing_in_source(without_extra_args) == [
        "vllm.sampling_params.SamplingParams: no extra_args"
    ]


def test_the_live_probe_names_what_is_missing():
    _installed_vllm()
    need = Need(
        "vllm.sampling_params", "SamplingParams", ("extra_args", "no_such_field"), "a test need"
    )
    assert missing_live((need,), where=lambda w: True) == [
        "vllm.sampling_params.SamplingParams (a test need): no no_such_field"
    ]
    gone = Need("vllm.no_such_module", "X", ("y",), "gone")
    assert "cannot import" in missing_live((gone,), where=lambda w: True)[0]


# -- runner kind, by attribute ---------------------------------------------------------------------


def _v1_runner():
    return SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=[], num_reqs=0),
        query_start_loc=SimpleNamespace(np=np.zeros(1, dtype=np.int32)),
        requests={},
        get_model=lambda: None,
    )


def _v2_runner(batch, new_reqs_seen: list):
    return SimpleNamespace(
        req_states=SimpleNamespace(req_id_to_index={}),
        prepare_inputs=lambda *a, **kw: batch,
        add_requests=new_reqs_seen.append,
        get_model=lambda: None,
    )


def test_runner_kind_is_decided_by_attributes():
    assert vllm_worker.runner_kind(_v1_runner()) == "v1"
    assert vllm_worker.runner_kind(_v2_runner(None, [])) == "v2"
    odd = _v1_runner()
    del odd.query_start_loc
    with pytest.raises(RuntimeError, match=r"missing: query_start_loc, query_start_loc\.np\)"):
        vllm_worker.runner_kind(odd)


def test_runner_view_v2_maps_rows_to_requests_with_033_field_names():
    """RunnerViewV2 on a runner shaped like 0.33's V2 (the names are checked against its source
    above): new requests' guard arguments, the step's batch, and requests leaving the runner."""
    sp = pytest.importorskip("vllm").SamplingParams
    args = RequestArgs(key="g-1", channel="/nonexistent", answer_start=5, score_from=5, reset_id=7)
    batch = SimpleNamespace(
        req_ids=["plain-0", "g-1-abcdefgh"],
        num_reqs=2,
        query_start_loc_np=np.array([0, 3, 8], dtype=np.int32),
    )
    seen: list = []
    runner = _v2_runner(batch, seen)
    view = RunnerViewV2(runner)
    so = SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id="plain-0", sampling_params=sp()),
            SimpleNamespace(
                req_id="g-1-abcdefgh", sampling_params=sp(extra_args={"guard": args.to_dict()})
            ),
        ]
    )
    runner.add_requests(so)
    assert seen == [so]  # vLLM's own add_requests still runs
    assert runner.prepare_inputs("scheduler_output", "batch_req_state", "desc", 0) is batch
    req_ids, qsl, extra = view.current()
    assert req_ids == ["plain-0", "g-1-abcdefgh"] and qsl.tolist() == [0, 3, 8]
    assert extra(0, "plain-0") is None and extra(1, "g-1-abcdefgh") == args
    runner.req_states.req_id_to_index.update({"plain-0": 0, "g-1-abcdefgh": 1})
    assert view.alive_keys() == {"g-1"}
    del runner.req_states.req_id_to_index["g-1-abcdefgh"]
    assert view.alive_keys() == set()


# -- parallel layout inside the worker --------------------------------------------------------------


def test_only_tensor_parallel_rank_0_writes_score_records(tmp_path):
    """Every rank of a stage runs the monitors; a second rank's records would duplicate rank 0's."""
    for rank in (0, 1):
        ws = WorkerState()
        ws.layout = Layout(tp_rank=rank, tp_size=2, layers=(0, 1))
        path = tmp_path / f"rank{rank}"
        live = ws._open(
            RequestArgs(key=f"k{rank}", channel=str(path), answer_start=0, score_from=0)
        )
        live.writer.write(0, [])
        live.writer.close()
        assert path.exists() == (rank == 0)


class _Block(torch.nn.Module):
    def forward(self, x):
        return x + 1


def test_install_hooks_only_the_layers_this_pipeline_stage_holds(monkeypatch):
    from vllm.model_executor.models.utils import PPMissingLayer

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList(
        [PPMissingLayer(), PPMissingLayer(), _Block(), _Block()]
    )
    runner = _v1_runner()
    runner.get_model = lambda: model
    monkeypatch.setattr(vllm_worker, "STATE", WorkerState())
    assert vllm_worker.install(runner, [1, 3]) == [3]
    assert vllm_worker.STATE.layout.layers == (2, 3)
    assert vllm_worker.STATE.hooked_layers == {3}
    with pytest.raises(ValueError, match="out of range"):
        vllm_worker.install(runner, [4])
    for h in vllm_worker.STATE.handles:
        h.remove()


def test_vllm_033_takes_the_arguments_the_engine_passes(vllm033):
    """Keyword arguments the engine passes, beyond member names: AsyncLLM.from_vllm_config(config,
    disable_log_stats=...) and EngineArgs.create_engine_config() with no arguments."""

    def params(rel: str, cls: str, fn: str) -> tuple[set[str], int]:
        tree = ast.parse(vllm033.read(rel).decode())
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        f = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == fn)
        names = {a.arg for a in f.args.args + f.args.kwonlyargs}
        return names, len(f.args.args) - len(
            f.args.defaults
        )  # required positionals, self/cls included

    names, _ = params("vllm/v1/engine/async_llm.py", "AsyncLLM", "from_vllm_config")
    assert {"vllm_config", "disable_log_stats"} <= names
    _, required = params("vllm/engine/arg_utils.py", "EngineArgs", "create_engine_config")
    assert required == 1  # self only
