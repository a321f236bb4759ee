"""The SAE feature monitor: the sliced encoder against the full one, the rules and their [0, 1]
scores, steering, the policy spec, and the service building it for a real (random) model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from guard.controller.backtrack import GuardedGeneration
from guard.controller.record import GenerationRecord
from guard.errors import ModelLoadError, PolicyError
from guard.policy import load_policy
from guard.policy.build import build_monitor, default_controller_config
from guard.sae import Sae, save_saelens
from guard.sae.monitor import SaeFeatureMonitor, WatchedFeature, calibrate_topk_threshold
from guard.sampling import SamplingParams
from tests.conftest import generation_record

torch.set_num_threads(1)
D, N = 24, 96
IDX = [3, 17, 40, 95]


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_sae(
    activation: str, *, apply_b_dec: bool = False, normalize: str = "none", d: int = D, n: int = N
) -> Sae:
    kw = {}
    if activation == "jumprelu":
        kw["threshold"] = torch.rand(n, generator=g(5))
    if activation == "gated":
        kw.update(
            b_gate=torch.randn(n, generator=g(6)),
            r_mag=0.3 * torch.randn(n, generator=g(7)),
            b_mag=torch.randn(n, generator=g(8)),
        )
    if activation == "topk":
        kw["k"] = 10
    return Sae(
        torch.randn(d, n, generator=g(1)),
        torch.randn(n, generator=g(2)),
        torch.randn(n, d, generator=g(3)),
        torch.randn(d, generator=g(4)),
        activation,
        apply_b_dec_to_input=apply_b_dec,
        normalize=normalize,
        norm_scale=0.4 if normalize == "expected_average_only_in" else None,
        layer=1,
        **kw,
    )


def watch(idx=IDX, thr=1.0) -> list[WatchedFeature]:
    return [WatchedFeature(i, thr) for i in idx]


def hidden(n: int = 33, d: int = D) -> torch.Tensor:
    return 2.0 * torch.randn(n, d, generator=g(11)) + 0.5


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize(
    "normalize", ["none", "constant_norm_rescale", "layer_norm", "expected_average_only_in"]
)
def test_sliced_features_equal_the_full_encoder(activation, apply_b_dec, normalize):
    sae = random_sae(activation, apply_b_dec=apply_b_dec, normalize=normalize)
    mon = SaeFeatureMonitor("m", sae, watch())
    x = hidden()
    full = sae.encode(x)[:, IDX]
    assert (full > 0).any(), "the test inputs should activate some watched features"
    torch.testing.assert_close(mon.feature_acts(x), full)
    assert mon._sliced.W.shape == (D, 2 * len(IDX) if activation == "gated" else len(IDX))


def test_half_precision_input_is_upcast():
    sae = random_sae("jumprelu", apply_b_dec=True)
    mon = SaeFeatureMonitor("m", sae, watch())
    x = hidden().to(torch.bfloat16)
    torch.testing.assert_close(mon.feature_acts(x), sae.encode(x.float())[:, IDX])


def test_topk_uses_a_pre_activation_threshold(caplog):
    sae = random_sae("topk", apply_b_dec=True)
    x = hidden(200)
    theta = calibrate_topk_threshold(sae, x, batch=64)
    pre = sae.pre_activation(x)
    naive_kth = torch.stack(
        [torch.relu(row).sort(descending=True).values[sae.k - 1] for row in pre]
    )
    assert theta == pytest.approx(float(naive_kth.mean()), rel=1e-5)
    mon = SaeFeatureMonitor("m", sae, watch(), topk_threshold=theta)
    torch.testing.assert_close(mon.feature_acts(x), (torch.relu(pre) * (pre > theta))[:, IDX])
    # Exact TopK activations agree with the approximation wherever both are large.
    exact, approx = sae.encode(x)[:, IDX], mon.feature_acts(x)
    agree = ((exact > 0) == (approx > 0)).float().mean()
    assert agree > 0.85
    with caplog.at_level(logging.WARNING):
        upper = SaeFeatureMonitor("u", sae, watch())
    assert "without a calibrated pre-activation threshold" in caplog.text
    assert (
        upper.feature_acts(x) >= exact - 1e-4
    ).all()  # rounding differs between the two products


def _identity_sae(n: int = 4) -> Sae:
    """Feature i == relu(x_i): scores can be checked by hand."""
    return Sae(torch.eye(n), torch.zeros(n), torch.eye(n), torch.zeros(n), "relu", layer=0)


@pytest.mark.parametrize(
    "rule, x, ratio",
    [
        ("any", [2.0, 0.0, 0.0, 0.0], 1.0),
        ("any", [4.0, 1.5, 0.0, 0.0], 2.0),
        ("any", [-1.0, 0.0, 0.0, 0.0], 0.0),
        ("all", [4.0, 1.5, 0.0, 0.0], 0.5),
        ("all", [2.0, 3.0, 0.0, 0.0], 1.0),
        ("weighted", [2.0, 1.0, 0.0, 0.0], (1 * 2.0 + 3 * 1.0) / 5.0),
        ("weighted", [0.0, 0.0, 9.0, 0.0], 0.0),
    ],
)
def test_rules_and_scores(rule, x, ratio):
    feats = [WatchedFeature(0, 2.0, 1.0), WatchedFeature(1, 3.0, 3.0)]
    mon = SaeFeatureMonitor(
        "m",
        _identity_sae(),
        feats,
        rule=rule,
        weighted_threshold=5.0 if rule == "weighted" else None,
    )
    h = torch.tensor([x])
    assert float(mon.ratio(h)[0]) == pytest.approx(ratio)
    score = mon.score(h, [0])[0]
    assert score == pytest.approx(ratio / (1 + ratio)) and 0.0 <= score < 1.0


def test_fires_exactly_when_the_rule_holds():
    mon = SaeFeatureMonitor("m", _identity_sae(), [WatchedFeature(2, 1.5)])
    assert mon.threshold == 0.5 and mon.aggregation.kind == "none"
    h = torch.zeros(4, 4)
    h[:, 2] = torch.tensor([1.0, 1.5, 1.5001, 0.2])
    state = mon.new_state()
    assert state.extend(0, mon.score(h, [0, 1, 2, 3])) == 2
    assert state.raw[1] == pytest.approx(0.5)


def test_weighted_threshold_defaults_to_weighted_feature_thresholds():
    mon = SaeFeatureMonitor("m", _identity_sae(), [(0, 2.0, 1.0), (1, 3.0, 0.5)], rule="weighted")
    assert mon.weighted_threshold == pytest.approx(3.5)


def test_steering_vector_is_unit_weighted_decoder_sum():
    sae = random_sae("relu")
    mon = SaeFeatureMonitor("m", sae, [WatchedFeature(3, 1.0, 2.0), WatchedFeature(17, 1.0, -1.0)])
    v = 2.0 * sae.W_dec[3] - sae.W_dec[17]
    torch.testing.assert_close(mon.steering_vector(), v / v.norm())


def test_monitor_rejects_bad_arguments():
    sae = random_sae("relu")
    with pytest.raises(ValueError, match=r"feature indices \[96\] out of range"):
        SaeFeatureMonitor("m", sae, watch([3, 96]))
    with pytest.raises(ValueError, match="threshold must be > 0"):
        WatchedFeature(1, 0.0)
    with pytest.raises(ValueError, match=r"expects \[n, 24\]"):
        SaeFeatureMonitor("m", sae, watch()).score(torch.zeros(2, 25), [0, 1])
    sae.layer = None
    with pytest.raises(ValueError, match="needs a layer"):
        SaeFeatureMonitor("m", sae, watch())


# -- policy and service -------------------------------------------------------------------------


POLICY = """\
name: sae-demo
model: {{engine: transformers, path: {model}}}
monitors:
  - kind: sae
    name: feat
    path: ./sae
    {extra}
    features: {features}
    action: log
log: {{path: ./guard.db}}
"""


def write_policy(
    dir: Path, model: Path, features: str = "[{index: 5, threshold: 1.0}]", extra: str = ""
) -> Path:
    path = dir / "policy.yaml"
    path.write_text(POLICY.format(model=model, features=features, extra=extra or "rule: any"))
    return path


def tiny_sae(dir: Path, *, d: int, layer: int = 1, hot: int | None = None) -> Path:
    """A random SAE for ``d``-dim activations; feature ``hot`` gets a huge bias so it always fires."""
    sae = random_sae("relu", apply_b_dec=True, d=d, n=32)
    sae.layer = None
    if hot is not None:
        sae.b_enc[hot] = 1e4
    return save_saelens(
        sae, dir / "sae", model_name="tiny", hook_name=f"blocks.{layer}.hook_resid_post"
    )


def test_policy_spec_validates(tmp_path, tiny_model_dir):
    (tmp_path / "sae").mkdir()
    spec = load_policy(write_policy(tmp_path, tiny_model_dir)).monitors[0]
    assert spec.kind == "sae" and spec.path == tmp_path.resolve() / "sae" and spec.rule == "any"
    bad = [
        ("[{index: 1, threshold: 0}]", "", "greater than 0"),
        ("[]", "", "at least 1 item"),
        ("[{index: 1, threshold: 1}, {index: 1, threshold: 2}]", "", "index twice"),
        ("[{index: 1, threshold: 1}]", "weighted_threshold: 2.0", "only applies to rule weighted"),
        ("[{index: 1, threshold: 1, wieght: 2}]", "", "wieght"),
    ]
    for features, extra, message in bad:
        with pytest.raises(PolicyError, match=message):
            load_policy(write_policy(tmp_path, tiny_model_dir, features, extra))


def test_every_sae_spec_field_has_a_description():
    from guard.policy import schema

    for model in (schema.SaeMonitorSpec, schema.SaeFeatureSpec):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def _service_monitor(policy_path: Path, engine):
    """The monitor as the service builds it (guard.policy.build, the service's one factory)."""
    policy = load_policy(policy_path)
    return build_monitor(policy.monitors[0], policy, engine)


def test_service_builds_the_monitor_and_checks_the_model(tmp_path, tiny_model_dir, tiny_engine):
    d, layers = tiny_engine.info.d_model, tiny_engine.info.num_layers
    tiny_sae(tmp_path, d=d, layer=layers - 1)
    bound = _service_monitor(write_policy(tmp_path, tiny_model_dir), tiny_engine)
    assert isinstance(bound.monitor, SaeFeatureMonitor) and bound.monitor.layer == layers - 1
    assert bound.action == "shadow"  # action: log, the alias
    tiny_sae(tmp_path, d=d + 8)
    with pytest.raises(
        ModelLoadError, match=f"reads {d + 8}-dim activations but model .* has d_model {d}"
    ):
        _service_monitor(write_policy(tmp_path, tiny_model_dir), tiny_engine)
    tiny_sae(tmp_path, d=d, layer=layers)
    with pytest.raises(
        ModelLoadError, match=f"reads layer {layers} but model .* has {layers} layers"
    ):
        _service_monitor(write_policy(tmp_path, tiny_model_dir), tiny_engine)


def test_service_needs_a_layer_for_files_without_a_hook(tmp_path, tiny_model_dir, tiny_engine):
    d = tiny_engine.info.d_model
    sae = random_sae("jumprelu", d=d, n=32)
    (tmp_path / "sae").mkdir()
    np.savez(
        tmp_path / "sae" / "params.npz",
        W_enc=sae.W_enc.numpy(),
        b_enc=sae.b_enc.numpy(),
        W_dec=sae.W_dec.numpy(),
        b_dec=sae.b_dec.numpy(),
        threshold=sae.threshold.numpy(),
    )
    with pytest.raises(ModelLoadError, match="names no hook point; set `layer:`"):
        _service_monitor(write_policy(tmp_path, tiny_model_dir), tiny_engine)
    bound = _service_monitor(write_policy(tmp_path, tiny_model_dir, extra="layer: 0"), tiny_engine)
    assert bound.monitor.layer == 0


def _generate(engine, bound) -> GenerationRecord:
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Tell me something."}])
    record = generation_record(prompt_tokens=len(prompt))
    gen = GuardedGeneration(
        engine,
        prompt,
        SamplingParams(seed=1, max_tokens=6),
        [bound],
        default_controller_config(),
        record,
        lambda e: None,
    )
    while not gen.advance():
        pass
    gen.close()
    return record


def test_monitor_reads_real_activations_in_a_generation(tmp_path, tiny_model_dir, tiny_engine):
    tiny_sae(tmp_path, d=tiny_engine.info.d_model, hot=5)
    hot = _generate(
        tiny_engine, _service_monitor(write_policy(tmp_path, tiny_model_dir), tiny_engine)
    )
    assert hot.firings and all(f.monitor == "feat" and f.score > 0.5 for f in hot.firings)
    cold = _generate(
        tiny_engine,
        _service_monitor(
            write_policy(tmp_path, tiny_model_dir, "[{index: 5, threshold: 1.0e+9}]"), tiny_engine
        ),
    )
    assert not cold.firings


def test_policy_topk_threshold_reaches_the_monitor(tmp_path, tiny_model_dir, tiny_engine):
    """A TopK SAE is scored with the policy's calibrated pre-activation threshold."""
    d = tiny_engine.info.d_model
    sae = random_sae("relu", d=d, n=32)
    sae = Sae(
        W_enc=sae.W_enc, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=sae.b_dec, activation="topk", k=4
    )
    save_saelens(sae, tmp_path / "sae", model_name="tiny", hook_name="blocks.0.hook_resid_post")
    x = torch.randn(64, d, generator=g(11))
    pre = (x @ sae.W_enc + sae.b_enc)[:, 5]
    theta = float(pre.quantile(0.5))
    bound = _service_monitor(
        write_policy(tmp_path, tiny_model_dir, extra=f"rule: any\n    topk_threshold: {theta}"),
        tiny_engine,
    )
    acts = bound.monitor.feature_acts(x)[:, 0]
    expected = torch.where(pre > theta, pre, torch.zeros_like(pre))
    torch.testing.assert_close(acts, expected, atol=1e-5, rtol=1e-5)
