"""Numerically corrupt monitors: refused at load and at hot reload, and a non-finite score at
scoring time is a monitor error handled by ``on_monitor_error`` (transformers engine; the vLLM
engine's twin is in tests/test_vllm.py)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from test_controller import TokenMonitor, assert_invariants, client_view, run

from guard.controller.backtrack import BoundMonitor
from guard.errors import ModelLoadError
from guard.monitors.probe import ProbeMonitor
from guard.service import GuardService


class BrokenMonitor(TokenMonitor):
    """Scores like an idle TokenMonitor until its ``fail_on``-th call, then raises or returns ``bad``."""

    def __init__(self, fail_on: int, bad: str):
        super().__init__({-1}, layer=1, name="broken")
        self.fail_on, self.calls, self.bad = fail_on, 0, bad

    def score(self, hidden, token_ids):
        self.calls += 1
        if self.calls >= self.fail_on:
            if self.bad == "raise":
                raise RuntimeError("probe weights on the wrong device")
            return [float(self.bad)] * len(token_ids)
        return super().score(hidden, token_ids)


@pytest.mark.parametrize("bad", ["raise", "nan", "inf", "-inf"])
def test_fail_closed_refuses_a_monitor_that_breaks_mid_generation(tiny_engine, bad):
    events, rec, logged = run(
        tiny_engine,
        [BrokenMonitor(6, bad)],
        holdback_tokens=0,
        refusal="No.",
        on_monitor_error="fail_closed",
    )
    fin = events[-1]
    assert (fin.outcome, fin.text, client_view(events)) == ("refused", "No.", "No.")
    (err,) = rec.monitor_errors
    assert err.monitor == "broken" and err.handling == "refused" and err.scope == "output"
    if bad != "raise":
        assert "non-finite score" in err.error
    assert logged == [rec] and rec.sampled_tokens == len(rec.spans[0].token_ids)
    assert all(math.isfinite(s) for span in rec.spans for v in span.scores.values() for s in v)


@pytest.mark.parametrize("bad", ["raise", "nan", "inf"])
def test_fail_open_disables_a_monitor_that_breaks_mid_generation(tiny_engine, bad):
    plain, _, _ = run(tiny_engine)
    broken = BrokenMonitor(4, bad)
    events, rec, logged = run(
        tiny_engine, [broken], holdback_tokens=2, on_monitor_error="fail_open"
    )
    assert events[-1].text == plain[-1].text and events[-1].outcome == "clean"
    assert broken.calls == 4, "not called again once disabled"
    assert [e.handling for e in rec.monitor_errors] == ["disabled"] and logged == [rec]
    assert_invariants(events, rec)


def test_a_nan_on_the_prompt_is_a_monitor_error(tiny_engine):
    events, rec, _ = run(tiny_engine, [BoundMonitor(BrokenMonitor(1, "nan"), scope="prompt")])
    assert events[-1].outcome == "refused" and rec.sampled_tokens == 0
    assert "non-finite" in rec.monitor_errors[0].error and rec.monitor_errors[0].scope == "prompt"


# -- load time -----------------------------------------------------------------------------------


def _save_raw(directory, d=64, **bad) -> None:
    """A probe directory written without going through ProbeMonitor (which refuses bad values)."""
    good = ProbeMonitor(
        "p",
        1,
        torch.randn(d, generator=torch.Generator().manual_seed(0)),
        0.0,
        mean=torch.zeros(d),
        std=torch.ones(d),
        threshold=0.5,
    )
    good.save(directory)
    tensors = {
        "direction": good.direction,
        "bias": torch.tensor([0.0]),
        "mean": torch.zeros(d),
        "std": torch.ones(d),
    }
    for key, value in bad.items():
        tensors[key] = tensors[key].clone()
        tensors[key][0] = value
    save_file(tensors, str(directory / "probe.safetensors"))


@pytest.mark.parametrize(
    "key,value",
    [
        ("direction", float("nan")),
        ("bias", float("-inf")),
        ("std", float("inf")),
        ("mean", float("nan")),
    ],
)
def test_a_probe_with_non_finite_weights_does_not_load(tmp_path, key, value):
    _save_raw(tmp_path / "probe", **{key: value})
    with pytest.raises(ModelLoadError, match=f"'{key}' holds 1 non-finite"):
        ProbeMonitor.load(tmp_path / "probe", name="p")


@pytest.mark.parametrize("threshold", [float("nan"), float("inf")])
def test_a_non_finite_threshold_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold holds 1 non-finite"):
        ProbeMonitor("p", 1, torch.ones(4), 0.0, threshold=threshold)


def test_a_hot_reload_to_a_nan_probe_keeps_the_last_good_policy(tiny_model_dir, tmp_path):
    _save_raw(tmp_path / "good")
    _save_raw(tmp_path / "bad", direction=float("nan"))
    path = tmp_path / "p.yaml"

    def text(probe: str) -> str:
        return (
            f"name: p\nmodel: {{path: {tiny_model_dir}}}\nlog: {{path: {tmp_path / 'g.db'}}}\n"
            f"monitors:\n  - {{name: harm, kind: probe, path: {tmp_path / probe}}}\n"
        )

    path.write_text(text("good"))
    service = GuardService.from_policy_files([path])
    try:
        good = service.resolve("p")
        path.write_text(text("bad"))
        assert service.reload_changed() == []
        error = service.health()["models"][0]["reload_error"]
        assert error is not None and "non-finite" in error and "'direction'" in error
        assert service.resolve("p") is good
    finally:
        service.close()


def test_an_sae_with_nan_in_a_watched_feature_does_not_build():
    from guard.sae.model import Sae
    from guard.sae.monitor import SaeFeatureMonitor

    d, k = 8, 16
    g = torch.Generator().manual_seed(0)
    W_enc = torch.randn(d, k, generator=g)
    W_enc[3, 5] = float("nan")
    sae = Sae(
        W_enc=W_enc,
        b_enc=torch.zeros(k),
        W_dec=torch.randn(k, d, generator=g),
        b_dec=torch.zeros(d),
        activation="relu",
        layer=1,
    )
    SaeFeatureMonitor("ok", sae, [(4, 1.0)])  # an unwatched NaN column is never read
    with pytest.raises(ValueError, match="watched encoder columns"):
        SaeFeatureMonitor("bad", sae, [(5, 1.0)])
