"""The ``guard::layer`` op (guard.engine.vllm_worker) inside a torch.compile'd model, without vLLM:
blocks shaped like vLLM's (they return ``(hidden, residual)``), the op put after each one by the
same forward hook vLLM's worker installs, compiled by inductor with ``fullgraph=True`` (what vLLM's
CPU backend does). The scores it writes into the persistent buffers must equal the monitors' own
scores of the residual stream, steering must reach only the rows it is set for, and a monitor
that raises must leave NaN in its column without stopping the forward."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from guard.engine import vllm_worker
from guard.engine.vllm_worker import WorkerState, _layer_hook
from guard.monitors.base import AggregationSpec, Monitor
from guard.monitors.probe import ProbeMonitor
from guard.sae.model import Sae
from guard.sae.monitor import SaeFeatureMonitor, WatchedFeature
from guard.testing import faulty_probe

D = 32


class Block(nn.Module):
    """vLLM-style decoder block: returns ``(hidden, residual)``; the stream is their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(D, D)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        residual = hidden if residual is None else hidden + residual
        return torch.tanh(self.mlp(residual)), residual


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden + residual


def _hooked(model: Model):
    """``model`` with the guard's op after each block (as vLLM's worker installs it), compiled as
    vLLM's CPU backend compiles; the unhooked ``model`` stays the reference."""
    hooked = copy.deepcopy(model)
    for i, layer in enumerate(hooked.layers):
        layer.register_forward_hook(_layer_hook(i))
    return torch.compile(hooked, backend="inductor", fullgraph=True, dynamic=True)


def _streams(model: Model, x: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after each block, from an eager forward of the unhooked model."""
    out, hidden, residual = [], x, None
    for layer in model.layers:
        hidden, residual = layer(hidden, residual)
        out.append(hidden + residual)
    return out


@pytest.fixture
def state(monkeypatch):
    st = WorkerState()
    st.max_rows = 16
    monkeypatch.setattr(vllm_worker, "STATE", st)
    return st


def _monitors():
    torch.manual_seed(1)
    probe = ProbeMonitor("probe", 1, torch.randn(D), 0.1)
    sae = Sae(
        torch.randn(D, 64),
        torch.randn(64),
        torch.randn(64, D),
        torch.randn(D),
        "relu",
        apply_b_dec_to_input=True,
        normalize="layer_norm",
        layer=1,
    )
    return [
        probe,
        SaeFeatureMonitor("sae", sae, [WatchedFeature(i, 0.2) for i in (3, 9)], rule="any"),
    ]


def test_compiled_op_scores_every_row_as_the_monitors_do(state):
    torch.manual_seed(0)
    model = Model().eval()
    mons = _monitors()
    for i, mon in enumerate(mons):
        state.add_monitor(f"m{i}", pickle.dumps(mon))
    late = ProbeMonitor("late", 2, torch.randn(D), -0.3)
    state.add_monitor("late", pickle.dumps(late))
    compiled = _hooked(model)
    for n in (5, 11):  # two batch sizes through one dynamic-shape graph
        x = torch.randn(n, D)
        with torch.no_grad():
            out = compiled(x)
            streams = _streams(model, x)
            assert torch.allclose(
                out, model(x), atol=1e-5
            )  # the op passes the hidden state through
        for i, mon in enumerate(mons):
            torch.testing.assert_close(
                state.buffers[1][:n, i], mon.score_tensor(streams[1]).double(), atol=1e-6, rtol=0
            )
        torch.testing.assert_close(
            state.buffers[2][:n, 0], late.score_tensor(streams[2]), atol=1e-6, rtol=0
        )
    assert state.calls["layer_hooks"] >= 6


def test_compiled_op_steers_only_the_rows_it_is_told_to(state):
    torch.manual_seed(0)
    model = Model().eval()
    vec = torch.randn(D)
    state.add_steer("s", 0, vec.tolist())
    compiled = _hooked(model)
    x = torch.randn(6, D)
    state.steer_coef[0][2:4, 0] = 1.0  # what begin_step sets for a request's rows 2..3
    with torch.no_grad():
        got = compiled(x)
        h, r = model.layers[0](x, None)
        want = model.layers[2](
            *model.layers[1](h + torch.outer(torch.tensor([0, 0, 1, 1, 0, 0.0]), vec), r)
        )
    torch.testing.assert_close(got, want[0] + want[1], atol=1e-5, rtol=1e-5)
    state.steer_coef[0].zero_()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_a_monitor_fault_inside_the_compiled_op_leaves_nan_and_the_forward_runs(state, fault):
    torch.manual_seed(0)
    model = Model().eval()
    good = ProbeMonitor("good", 1, torch.randn(D), 0.0)
    state.add_monitor("bad", pickle.dumps(faulty_probe(good, name="bad", fail_at=2, fault=fault)))
    state.add_monitor("good", pickle.dumps(good))
    compiled = _hooked(model)
    x = torch.randn(4, D)
    with torch.no_grad():
        compiled(x)
        assert torch.isfinite(state.buffers[1][:4]).all() and not state.op_errors
        out = compiled(x)  # the faulty probe's 2nd call
    assert torch.allclose(out, model(x), atol=1e-5)
    assert torch.isnan(state.buffers[1][:4, 0]).all()
    assert (state.op_errors == {"bad": "RuntimeError: injected monitor fault"}) == (
        fault == "raise"
    )
    torch.testing.assert_close(
        state.buffers[1][:4, 1],
        good.score_tensor(_streams(model, x)[1]).double(),
        atol=1e-6,
        rtol=0,
    )


def test_a_monitor_without_tensor_scoring_is_refused(state):
    with pytest.raises(TypeError, match="no score_tensor"):
        state.add_monitor("x", pickle.dumps(ListOnly()))


class ListOnly(Monitor):
    """An activation monitor with list scoring only (no ``score_tensor``)."""

    name, layer, threshold, aggregation = "list", 0, 0.5, AggregationSpec()

    def score(self, hidden, token_ids):
        return [0.0] * len(token_ids)


def test_compiled_is_the_default_and_a_policy_can_force_eager():
    from guard.policy.build import vllm_options
    from guard.policy.schema import VLLMSpec

    assert vllm_options(VLLMSpec()).enforce_eager is False
    assert vllm_options(VLLMSpec(enforce_eager=True)).enforce_eager is True
