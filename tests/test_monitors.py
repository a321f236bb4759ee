"""ProbeMonitor and ResetTokenMonitor: scoring against naive math, storage, errors, and MonitorState."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from guard.engine.base import ModelInfo
from guard.engine.transformers_engine import HFChatTokenizer
from guard.errors import ModelLoadError
from guard.monitors.base import AggregationSpec
from guard.monitors.probe import ProbeMonitor
from guard.monitors.reset_token import ResetTokenMonitor
from guard.testing import make_tokenizer

D = 16


def _probe(standardized: bool = True, **kw) -> ProbeMonitor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g)
    mean = torch.randn(D, generator=g) if standardized else None
    std = torch.rand(D, generator=g) + 0.5 if standardized else None
    return ProbeMonitor("p", 3, w, 0.25, mean=mean, std=std, **kw)


def _info(d_model: int = D, num_layers: int = 6) -> ModelInfo:
    return ModelInfo(
        name="m",
        num_layers=num_layers,
        d_model=d_model,
        vocab_size=100,
        context_length=64,
        eos_token_ids=frozenset({1}),
    )


@pytest.mark.parametrize("standardized", [True, False])
def test_probe_scores_match_naive_per_token_math(standardized):
    mon = _probe(standardized)
    hidden = torch.randn(7, D, generator=torch.Generator().manual_seed(1)) * 3
    naive = []
    for h in hidden.double():
        z = h if mon.mean is None else (h - mon.mean.double()) / mon.std.double()
        naive.append(1.0 / (1.0 + math.exp(-(float(z @ mon.direction.double()) + mon.bias))))
    got = mon.score(hidden, list(range(7)))
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(naive, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-6,
    )
    assert all(0.0 <= s <= 1.0 for s in got)


def test_probe_rejects_wrong_activation_width():
    with pytest.raises(ValueError, match=r"expects \[n, 16\]"):
        _probe().score(torch.zeros(2, D + 1), [0, 1])


def test_steering_vector_is_unit_gradient_direction_in_raw_space():
    mon = _probe()
    v = mon.steering_vector()
    torch.testing.assert_close(v.norm(), torch.tensor(1.0))
    expected = mon.direction / mon.std
    torch.testing.assert_close(v, expected / expected.norm())
    h = torch.zeros(1, D)
    assert mon.score(h + v, [0])[0] > mon.score(h, [0])[0] > mon.score(h - v, [0])[0]


def test_save_load_round_trip(tmp_path):
    mon = _probe(
        threshold=0.7, aggregation=AggregationSpec("window", window=3), meta={"method": "logreg"}
    )
    mon.save(tmp_path / "p")
    back = ProbeMonitor.load(tmp_path / "p", name="q")
    hidden = torch.randn(5, D)
    assert back.name == "q" and back.layer == 3 and back.threshold == 0.7
    assert back.aggregation == AggregationSpec("window", window=3)
    assert back.meta["method"] == "logreg" and back.meta["d_model"] == D
    torch.testing.assert_close(
        torch.tensor(back.score(hidden, [0] * 5)), torch.tensor(mon.score(hidden, [0] * 5))
    )
    torch.testing.assert_close(back.steering_vector(), mon.steering_vector())


def test_load_policy_overrides_take_precedence(tmp_path):
    _probe(threshold=0.7).save(tmp_path / "p")
    agg = AggregationSpec("none")
    back = ProbeMonitor.load(tmp_path / "p", name="q", layer=3, threshold=0.2, aggregation=agg)
    assert (back.layer, back.threshold, back.aggregation) == (3, 0.2, agg)


def test_load_refuses_a_different_layer(tmp_path):
    _probe().save(tmp_path / "p")
    with pytest.raises(ModelLoadError, match=r"trained on layer 3.*asks for layer 5"):
        ProbeMonitor.load(tmp_path / "p", name="q", layer=5)


def _rewrite_tensors(path, **changes):
    tensors = load_file(str(path / "probe.safetensors"))
    for k, v in changes.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    save_file(tensors, str(path / "probe.safetensors"))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: (p / "probe.json").unlink(), "probe.json is missing"),
        (lambda p: (p / "probe.safetensors").unlink(), "probe.safetensors is missing"),
        (lambda p: (p / "probe.json").write_text("{not json"), "cannot read probe metadata"),
        (lambda p: (p / "probe.safetensors").write_bytes(b"garbage"), "cannot read tensors"),
        (lambda p: _rewrite_tensors(p, direction=None), "tensor 'direction' is missing"),
        (lambda p: _rewrite_tensors(p, direction=torch.zeros(2, D)), "'direction' must have shape"),
        (
            lambda p: _rewrite_tensors(p, mean=torch.zeros(D + 1)),
            r"'mean' has shape \[17\], expected \[16\]",
        ),
        (lambda p: _rewrite_tensors(p, std=None), "'mean' and 'std' must be stored together"),
        (lambda p: _rewrite_tensors(p, bias=torch.zeros(3)), "'bias' must hold one value"),
        (
            lambda p: _rewrite_tensors(
                p, direction=torch.zeros(D + 1), mean=torch.zeros(D + 1), std=torch.ones(D + 1)
            ),
            "direction has 17 entries but probe.json says d_model 16",
        ),
        (lambda p: _edit_meta(p, version=99), "unsupported probe format"),
        (lambda p: _edit_meta(p, layer="three"), "field 'layer' is missing or not a int"),
        (lambda p: _edit_meta(p, aggregation={"kind": "ema", "alpha": 7}), "alpha must be in"),
    ],
)
def test_bad_probe_files_raise_model_load_error(tmp_path, breakage, message):
    _probe().save(tmp_path / "p")
    breakage(tmp_path / "p")
    with pytest.raises(ModelLoadError, match=message):
        ProbeMonitor.load(tmp_path / "p", name="q")


def _edit_meta(path, **changes):
    meta = json.loads((path / "probe.json").read_text())
    meta.update(changes)
    (path / "probe.json").write_text(json.dumps(meta))


def test_check_compatible():
    mon = _probe()
    mon.check_compatible(_info())
    with pytest.raises(ModelLoadError, match="d_model 16 but model 'm' has d_model 32"):
        mon.check_compatible(_info(d_model=32))
    with pytest.raises(ModelLoadError, match="reads layer 3 but model 'm' has 2 layers"):
        mon.check_compatible(_info(num_layers=2))


@pytest.fixture(scope="module")
def tokenizer():
    return HFChatTokenizer(make_tokenizer(["hello there, how are you?"] * 4, vocab_size=300))


def test_reset_monitor_fires_exactly_on_the_reset_token(tokenizer):
    mon = ResetTokenMonitor.from_tokenizer(tokenizer, name="r")
    rid = tokenizer.token_id("<|reset|>")
    ids = [*tokenizer.encode("hello there"), rid, *tokenizer.encode(" how are you")]
    assert mon.layer is None and mon.aggregation.kind == "none"
    scores = mon.score(None, ids)
    assert scores == [1.0 if t == rid else 0.0 for t in ids] and scores.count(1.0) == 1
    state = mon.new_state()
    assert state.extend(0, scores) == ids.index(rid)
    assert mon.new_state().extend(0, mon.score(None, tokenizer.encode("hello there"))) is None


def test_reset_monitor_needs_the_token_in_the_vocabulary(tokenizer):
    with pytest.raises(ModelLoadError, match="no token '<\\|backtrack\\|>'"):
        ResetTokenMonitor.from_tokenizer(tokenizer, token="<|backtrack|>", name="r")


@pytest.mark.parametrize(
    "agg",
    [
        AggregationSpec("ema", alpha=0.3),
        AggregationSpec("window", window=3),
        AggregationSpec("none"),
    ],
)
def test_monitor_state_truncate_restores_earlier_state(agg):
    mon = _probe(threshold=0.99, aggregation=agg)
    scores = torch.rand(12, generator=torch.Generator().manual_seed(2)).tolist()
    state = mon.new_state()
    state.extend(0, scores[:5])
    snapshot = (list(state.raw), list(state.agg))
    state.extend(5, scores[5:])
    state.truncate(5)
    assert (state.raw, state.agg) == snapshot
    # re-feeding after the truncation gives exactly what a fresh state computes
    state.extend(5, scores[5:])
    fresh = mon.new_state()
    fresh.extend(0, scores)
    assert (state.raw, state.agg) == (fresh.raw, fresh.agg)
