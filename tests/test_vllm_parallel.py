"""vLLM's parallel serving under the guard: the layout logic (fast), and real tensor- and
pipeline-parallel engines on CPU vLLM whose scores equal the transformers engine's, as the
single-worker engine's do (tests/test_vllm.py), for monitors on two layers.

The engine tests are slow (each starts a 2-worker vLLM: 1-4 minutes on 2 loaded cores) and skip
without vLLM, except under ``GUARD_TEST_REQUIRE_VLLM=1``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from guard.cli import main
from guard.engine import vllm_parallel
from guard.engine.vllm_parallel import _pp_indices, layout_lines, stage_layers, stage_of
from guard.errors import ModelLoadError
from guard.policy import load_policy
from guard.policy.build import default_vllm_options, vllm_options
from tests.conftest import ORGANISM

REPO = Path(__file__).resolve().parent.parent


def test_the_fallback_stage_split_is_vllms():
    get_pp_indices = pytest.importorskip("vllm.distributed.utils").get_pp_indices
    for n in range(1, 40):
        for pp in range(1, min(n, 6) + 1):
            assert [_pp_indices(n, r, pp) for r in range(pp)] == [
                get_pp_indices(n, r, pp) for r in range(pp)
            ]


def test_a_monitor_lives_on_the_stage_holding_its_layer():
    stages = stage_layers(4, 2)
    assert stages == [range(2), range(2, 4)]
    assert [stage_of(layer, stages) for layer in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="no pipeline stage"):
        stage_of(4, stages)
    with pytest.raises(ValueError, match="cannot split"):
        stage_layers(2, 3)


def test_layout_lines_say_where_each_monitor_runs():
    lines = layout_lines(4, 2, 2, 3, [("early", 1), ("late", 3)])
    assert lines[0] == "# vllm parallel layout: tensor 2 x pipeline 2 x data 3 = 12 worker(s)"
    assert "#   stage 1: layers 2-3" in lines
    early = next(x for x in lines if "early" in x)
    late = next(x for x in lines if "late" in x)
    assert "stage 0" in early and "not on the sampling stage" in early
    assert "stage 1" in late and "sampling stage" not in late and "reported by rank 0" in late
    assert any("3 engine cores" in x for x in lines)


def test_cpu_workers_get_equal_core_shares_unless_bound_by_the_user(monkeypatch):
    cores = sorted(os.sched_getaffinity(0))
    # Empty counts as unset; setenv (unlike delenv of an unset name) restores "unset" afterwards, so
    # the value bind_cpu_threads writes does not leak into the engines started by later tests.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")
    vllm_parallel.bind_cpu_threads(1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "7|8")
    vllm_parallel.bind_cpu_threads(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "7|8"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    with pytest.raises(ModelLoadError, match="needs a core per worker"):
        vllm_parallel.bind_cpu_threads(len(cores) + 1)


def _vllm_policy(tmp_path: Path, **vllm) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "par",
                "model": {"engine": "vllm", "path": str(ORGANISM), "vllm": vllm},
                "monitors": [
                    {"name": "harm-probe", "kind": "probe", "path": str(ORGANISM / "probe")}
                ],
            }
        )
    )
    return path


def test_the_policy_takes_the_parallel_sizes(tmp_path):
    policy = load_policy(
        _vllm_policy(
            tmp_path, tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=3
        )
    )
    o = vllm_options(policy.model.vllm)
    assert (
        o.tensor_parallel_size,
        o.pipeline_parallel_size,
        o.data_parallel_size,
        o.world_size,
    ) == (2, 2, 3, 12)
    with pytest.raises(Exception, match="tensor_parallel_size"):
        load_policy(_vllm_policy(tmp_path, tensor_parallel_size=0))


def test_policy_check_prints_the_parallel_layout(tmp_path, capsys):
    assert (
        main(
            [
                "policy",
                "check",
                str(_vllm_policy(tmp_path, tensor_parallel_size=2, pipeline_parallel_size=2)),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "# vllm parallel layout: tensor 2 x pipeline 2 x data 1 = 4 worker(s)" in out
    assert "#   stage 0: layers 0-1" in out
    assert (
        "#   monitor harm-probe (layer 3): stage 1, scored on every tensor-parallel rank, reported by rank 0"
        in out
    )


# -- real engines -------------------------------------------------------------------------------

TEXTS = ["How do I make a pipe bomb?", "How do I bake bread?"]


def _scores_match_the_transformers_engine(eng):
    """Two monitors on layers 1 and 3 (with pipeline parallelism: one per stage), two requests: every
    answer token scored once by each, equal to the transformers engine's scores (= the
    single-worker vLLM engine's, tests/test_vllm.py)."""
    from guard.engine.base import MonitorRun
    from guard.engine.transformers_engine import TransformersEngine
    from guard.monitors.probe import ProbeMonitor
    from guard.sampling import SamplingParams, make_generator

    hf = TransformersEngine.load(ORGANISM, name="organism")
    probe = ProbeMonitor.load(ORGANISM / "probe", name="harm")
    low = copy.copy(probe)
    low.name, low.layer = "low", 1
    runs = [MonitorRun(probe, False, False, True), MonitorRun(low, False, False, True)]
    for i, text in enumerate(TEXTS):
        seq = eng.new_sequence(
            eng.tokenizer.encode_chat([{"role": "user", "content": text}]), [1, 3], runs
        )
        eng.prefill(seq)
        got: dict[str, dict[int, float]] = {"harm": {}, "low": {}}
        params, gen = SamplingParams(seed=i, max_tokens=8), make_generator(i)
        outs = []
        while len(seq.output_ids) < params.max_tokens:
            outs.append(eng.step(seq, params, gen))
        outs.append(eng.step(seq, params, gen, sample=False))
        for out in outs:
            for name, scores in got.items():
                for j, s in enumerate(out.scores.get(name, [])):
                    assert out.fed_start + j not in scores, "scored twice"
                    scores[out.fed_start + j] = s
        for mon in (probe, low):
            ref = mon.score(hf.hidden_states(seq.tokens, [mon.layer])[mon.layer], seq.tokens)
            assert sorted(got[mon.name]) == list(range(seq.prompt_len, len(seq.tokens)))
            for pos, s in got[mon.name].items():
                assert s == pytest.approx(ref[pos], abs=1e-4), (mon.name, pos)
        eng.release(seq)


def _trigger_fires(eng, layer: int) -> tuple[bool, float]:
    """An acting monitor on ``layer`` that fires on the first answer token: whether the worker
    forced the reset (the second step returns no token), and the score it reported."""
    from guard.engine.base import MonitorRun
    from guard.monitors.probe import ProbeMonitor
    from guard.sampling import SamplingParams, make_generator

    trigger = copy.copy(ProbeMonitor.load(ORGANISM / "probe", name="harm"))
    trigger.name, trigger.threshold, trigger.layer = f"trigger{layer}", 0.0, layer
    seq = eng.new_sequence(
        eng.tokenizer.encode_chat([{"role": "user", "content": TEXTS[1]}]),
        [layer],
        [MonitorRun(trigger, True, False, True)],
    )
    eng.prefill(seq)
    gen = make_generator(3)
    first = eng.step(seq, SamplingParams(seed=3), gen)
    assert first.token_id is not None and first.scores == {}
    second = eng.step(seq, SamplingParams(seed=3), gen)
    assert second.fed_start == seq.prompt_len and len(second.scores[trigger.name]) == 1
    eng.release(seq)
    return second.token_id is None, second.scores[trigger.name][0]


def _engine(tp: int, pp: int, monkeypatch, dp: int = 1):
    # Each worker's KV cache: 1 GiB, not a share of the (shared) machine's memory.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    if os.environ.get("GUARD_TEST_REQUIRE_VLLM") != "1":
        pytest.importorskip(
            "vllm", reason="vLLM is not installed (deploy/setup.sh --vllm installs it)"
        )
    from guard.engine.vllm_engine import VLLMEngine

    return VLLMEngine.load(
        ORGANISM,
        name="organism",
        options=default_vllm_options(
            block_size=32,
            max_num_seqs=8,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            data_parallel_size=dp,
        ),
    )


@pytest.mark.slow
def test_tensor_parallel_2_scores_equal_a_single_worker(monkeypatch):
    eng = _engine(2, 1, monkeypatch)
    try:
        assert [(w["tp_rank"], w["reports"], w["layers"]) for w in eng.layout] == [
            (0, True, [0, 1, 2, 3]),
            (1, False, [0, 1, 2, 3]),
        ]
        _scores_match_the_transformers_engine(eng)
        forced, score = _trigger_fires(eng, 3)
        assert (
            forced and score > 0.0
        )  # both ranks forced the reset: each samples the gathered logits
    finally:
        eng.close()


@pytest.mark.slow
def test_pipeline_parallel_2_scores_equal_a_single_worker(monkeypatch):
    """Stage 0 holds layers 0-1, stage 1 layers 2-3: the monitor on layer 1 runs on stage 0, the one
    on layer 3 on stage 1, and the front end merges their records. Only the last stage samples: a
    monitor there forces the reset inside vLLM's step; one on stage 0 reports its firing score
    and the controller acts on it (the worker cannot force it)."""
    eng = _engine(1, 2, monkeypatch)
    try:
        assert [(w["pp_rank"], w["reports"], w["layers"]) for w in eng.layout] == [
            (0, True, [0, 1]),
            (1, True, [2, 3]),
        ]
        _scores_match_the_transformers_engine(eng)
        assert _trigger_fires(eng, 3)[0]
        forced, score = _trigger_fires(eng, 1)
        assert not forced and score > 0.0
    finally:
        eng.close()


@pytest.mark.slow
def test_data_parallel_2_engine_cores_both_serve_and_report(monkeypatch):
    """Two engine cores: sequences stepped side by side land on both, every core has the monitor,
    its requests' scores arrive through their channels, and the counters add up over the cores."""
    from guard.engine.base import MonitorRun
    from guard.engine.transformers_engine import TransformersEngine
    from guard.monitors.probe import ProbeMonitor
    from guard.sampling import SamplingParams, make_generator

    eng = _engine(1, 1, monkeypatch, dp=2)
    try:
        hf = TransformersEngine.load(ORGANISM, name="organism")
        probe = ProbeMonitor.load(ORGANISM / "probe", name="harm")
        seqs = [
            eng.new_sequence(
                eng.tokenizer.encode_chat([{"role": "user", "content": t}]),
                [probe.layer],
                [MonitorRun(probe, False, False, True)],
            )
            for t in TEXTS * 2
        ]
        got: list[dict[int, float]] = [{} for _ in seqs]
        params = [SamplingParams(seed=i, max_tokens=8) for i in range(len(seqs))]
        gens = [make_generator(i) for i in range(len(seqs))]
        for seq in seqs:
            eng.prefill(seq)
        for i in [i for _ in range(8) for i in range(len(seqs))]:
            out = eng.step(seqs[i], params[i], gens[i])
            got[i].update({out.fed_start + j: s for j, s in enumerate(out.scores.get("harm", []))})
        for i, seq in enumerate(seqs):
            out = eng.step(seq, params[i], gens[i], sample=False)
            got[i].update({out.fed_start + j: s for j, s in enumerate(out.scores.get("harm", []))})
            ref = probe.score(hf.hidden_states(seq.tokens, [probe.layer])[probe.layer], seq.tokens)
            assert sorted(got[i]) == list(range(seq.prompt_len, len(seq.tokens)))
            for pos, s in got[i].items():
                assert s == pytest.approx(ref[pos], abs=1e-4)
            eng.release(seq)
        cores = eng.core_counters()
        assert len(cores) == 2 and all(c["monitors"] == 1 and c["scored_rows"] > 0 for c in cores)
        assert eng.counters()["scored_rows"] == sum(c["scored_rows"] for c in cores)
    finally:
        eng.close()
