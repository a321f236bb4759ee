"""SAE loaders: each format written with its exact tensor names, loaded, and checked against a naive
encoder written here from the format's own description; bad files fail with a ModelLoadError that
names the file, the tensor and the shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from guard.errors import ModelLoadError
from guard.sae import Sae, layer_for_hook, load_sae, save_saelens

torch.set_num_threads(1)
D, N = 16, 48


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape))
    )


def x_batch(n: int = 9) -> torch.Tensor:
    return rand(n, D, seed=99) * 3.0


# -- naive references (written from the format descriptions, not from guard.sae) -------------


def ref_norm(x: torch.Tensor, kind: str, scale: float | None) -> torch.Tensor:
    out = torch.empty_like(x)
    for i, row in enumerate(x):
        if kind == "none":
            out[i] = row
        elif kind == "constant_norm_rescale":
            out[i] = row * math.sqrt(len(row)) / row.norm()
        elif kind == "layer_norm":
            c = row - row.mean()
            out[i] = c / (c.std() + 1e-5)
        else:
            out[i] = row * scale
    return out


def ref_topk(acts: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(acts)
    for i, row in enumerate(acts):
        order = sorted(range(len(row)), key=lambda j: -float(row[j]))[:k]
        for j in order:
            out[i, j] = row[j]
    return out


def ref_saelens(t: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    arch = cfg["architecture"]
    xs = ref_norm(
        x, cfg.get("normalize_activations", "none"), cfg.get("normalization_scaling_factor")
    )
    if cfg.get("apply_b_dec_to_input"):
        xs = xs - t["b_dec"]
    if arch == "gated":
        gate = (xs @ t["W_enc"] + t["b_gate"]) > 0
        return gate.float() * torch.relu(xs @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    pre = xs @ t["W_enc"] + t["b_enc"]
    if arch == "jumprelu":
        thr = t["threshold"] if "threshold" in t else t["log_threshold"].exp()
        return torch.relu(pre) * (pre > thr).float()
    if arch == "topk" or cfg.get("activation_fn_str") == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        return ref_topk(torch.relu(pre), k)
    return torch.relu(pre)


def saelens_tensors(arch: str) -> dict[str, torch.Tensor]:
    t = {"W_enc": rand(D, N, seed=1), "W_dec": rand(N, D, seed=2), "b_dec": rand(D, seed=3)}
    if arch == "gated":
        t.update(b_gate=rand(N, seed=4), r_mag=rand(N, seed=5) * 0.2, b_mag=rand(N, seed=6))
    else:
        t["b_enc"] = rand(N, seed=4)
    if arch == "jumprelu":
        t["threshold"] = rand(N, seed=7).abs()
    return t


def write_saelens(dir: Path, tensors: dict, cfg: dict) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dir / "sae_weights.safetensors"))
    (dir / "cfg.json").write_text(json.dumps(cfg))
    return dir


def v6_cfg(arch: str, **kw) -> dict:
    cfg = {
        "architecture": arch,
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "m",
            "hook_name": "blocks.3.hook_resid_post",
            "hook_head_index": None,
        },
    }
    cfg.update(kw)
    return cfg


# -- SAELens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "topk"])
@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize(
    "norm", ["none", "constant_norm_rescale", "layer_norm", "expected_average_only_in"]
)
def test_saelens_v6_round_trip_matches_naive_encode(tmp_path, arch, apply_b_dec, norm):
    tensors = saelens_tensors(arch)
    cfg = v6_cfg(arch, apply_b_dec_to_input=apply_b_dec, normalize_activations=norm)
    if arch == "topk":
        cfg["k"] = 5
    if norm == "expected_average_only_in":
        cfg["normalization_scaling_factor"] = 0.37
    sae = load_sae(write_saelens(tmp_path / "sae", tensors, cfg))
    x = x_batch()
    torch.testing.assert_close(sae.encode(x), ref_saelens(tensors, cfg, x))
    assert sae.layer == 3 and sae.hook_name == "blocks.3.hook_resid_post"


def test_saelens_log_threshold_is_exponentiated(tmp_path):
    tensors = saelens_tensors("standard")
    tensors["log_threshold"] = rand(N, seed=8) * 0.5
    cfg = v6_cfg("jumprelu")
    sae = load_sae(write_saelens(tmp_path / "sae", tensors, cfg))
    torch.testing.assert_close(sae.threshold, tensors["log_threshold"].exp())
    torch.testing.assert_close(sae.encode(x_batch()), ref_saelens(tensors, cfg, x_batch()))


def test_saelens_old_flat_cfg_with_topk_activation_fn(tmp_path):
    tensors = saelens_tensors("standard")
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": N,
        "hook_point": "blocks.4.hook_resid_pre",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": True,
    }
    sae = load_sae(write_saelens(tmp_path / "sae", tensors, cfg) / "sae_weights.safetensors")
    assert sae.activation == "topk" and sae.k == 3
    assert sae.layer == 3  # resid_pre of block 4 is the output of block 3
    torch.testing.assert_close(sae.encode(x_batch()), ref_saelens(tensors, cfg, x_batch()))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "gated"])
def test_save_saelens_writes_v6_and_round_trips(tmp_path, activation):
    t = saelens_tensors({"relu": "standard", "topk": "standard"}.get(activation, activation))
    sae = Sae(
        t["W_enc"],
        t.get("b_enc", t.get("b_gate")),
        t["W_dec"],
        t["b_dec"],
        activation,
        threshold=t.get("threshold"),
        k=4 if activation == "topk" else None,
        b_gate=t.get("b_gate"),
        r_mag=t.get("r_mag"),
        b_mag=t.get("b_mag"),
        apply_b_dec_to_input=True,
        normalize="expected_average_only_in",
        norm_scale=1.7,
    )
    out = save_saelens(
        sae,
        tmp_path / "out",
        model_name="tiny",
        hook_name="blocks.1.hook_resid_post",
        extra_cfg={"metadata": {"trained_by": "guard"}, "l1_coefficient": 0.1},
    )
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"] == {
        "model_name": "tiny",
        "hook_name": "blocks.1.hook_resid_post",
        "hook_head_index": None,
        "trained_by": "guard",
    }
    assert cfg["d_in"] == D and cfg["d_sae"] == N and cfg["l1_coefficient"] == 0.1
    back = load_sae(out)
    assert back.activation == activation and back.layer == 1
    torch.testing.assert_close(back.encode(x_batch()), sae.encode(x_batch()))


# -- Gemma Scope, sparsify, Goodfire --------------------------------------------------------------


def test_gemmascope_npz_is_jumprelu_without_b_dec_subtraction(tmp_path):
    t = {
        "W_enc": rand(D, N, seed=1),
        "b_enc": rand(N, seed=2),
        "W_dec": rand(N, D, seed=3),
        "b_dec": rand(D, seed=4),
        "threshold": rand(N, seed=5).abs(),
    }
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in t.items()})
    sae = load_sae(tmp_path, layer=5)
    x = x_batch()
    pre = x @ t["W_enc"] + t["b_enc"]
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > t["threshold"]).float())
    assert sae.layer == 5 and sae.hook_name is None
    assert load_sae(tmp_path / "params.npz").layer is None  # the caller must supply it


def test_sparsify_topk_after_subtracting_b_dec(tmp_path):
    d = tmp_path / "layers.6"
    d.mkdir()
    t = {
        "encoder.weight": rand(N, D, seed=1),
        "encoder.bias": rand(N, seed=2),
        "W_dec": rand(N, D, seed=3),
        "b_dec": rand(D, seed=4),
    }
    save_file(t, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": D,
                "k": 6,
                "num_latents": N,
                "expansion_factor": 3,
                "normalize_decoder": True,
                "multi_topk": False,
            }
        )
    )
    sae = load_sae(d)
    x = x_batch()
    acts = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    torch.testing.assert_close(sae.encode(x), ref_topk(acts, 6))
    assert sae.layer == 6


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_goodfire_relu(tmp_path, suffix):
    t = {
        "encoder_linear.weight": rand(N, D, seed=1),
        "encoder_linear.bias": rand(N, seed=2),
        "decoder_linear.weight": rand(D, N, seed=3),
        "decoder_linear.bias": rand(D, seed=4),
    }
    path = tmp_path / f"Llama-SAE-l2{suffix}"
    save_file(t, str(path)) if suffix == ".safetensors" else torch.save(t, path)
    sae = load_sae(path, layer=2)
    x = x_batch()
    torch.testing.assert_close(
        sae.encode(x), torch.relu(x @ t["encoder_linear.weight"].T + t["encoder_linear.bias"])
    )
    torch.testing.assert_close(sae.W_dec, t["decoder_linear.weight"].T)
    assert load_sae(tmp_path, layer=2).d_sae == N  # a directory holding one weights file


# -- bad files --------------------------------------------------------------------------------


def _break(tensors: dict, cfg: dict, how: str) -> None:
    if how == "missing":
        del tensors["b_enc"]
    elif how == "shape":
        tensors["W_dec"] = rand(N, D + 1, seed=9)
    elif how == "extra":
        tensors["W_skip"] = rand(D, D, seed=9)
    elif how == "arch":
        cfg["architecture"] = "matryoshka_batchtopk"
    elif how == "factor":
        cfg["normalize_activations"] = "expected_average_only_in"
    elif how == "norm":
        cfg["normalize_activations"] = "rms"
    elif how == "hook":
        cfg["metadata"]["hook_name"] = "blocks.2.hook_mlp_out"
    elif how == "embed":
        cfg["metadata"]["hook_name"] = "blocks.0.hook_resid_pre"
    elif how == "d_sae":
        cfg["d_sae"] = N + 1


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", r"sae_weights\.safetensors: tensor 'b_enc' is missing"),
        (
            "shape",
            r"sae_weights\.safetensors: tensor 'W_dec' has shape \[48, 17\], expected \[48, 16\]",
        ),
        ("extra", r"unexpected tensors \['W_skip'\]"),
        ("arch", r"cfg\.json: unknown SAE architecture 'matryoshka_batchtopk'"),
        (
            "factor",
            r"cfg\.json: normalize_activations is expected_average_only_in but no positive scaling factor",
        ),
        ("norm", r"normalize_activations 'rms' is not supported"),
        ("hook", r"unsupported SAE hook 'blocks\.2\.hook_mlp_out'.*hook_resid_post"),
        ("embed", r"embedding output, which is not an engine layer"),
        (
            "d_sae",
            r"cfg\.json: d_sae is 49 but sae_weights\.safetensors W_enc has shape \[16, 48\]",
        ),
    ],
)
def test_bad_saelens_files_name_the_problem(tmp_path, how, message):
    tensors, cfg = saelens_tensors("standard"), v6_cfg("standard")
    _break(tensors, cfg, how)
    with pytest.raises(ModelLoadError, match=message):
        load_sae(write_saelens(tmp_path / "sae", tensors, cfg))


def test_layer_that_contradicts_the_hook_is_refused(tmp_path):
    path = write_saelens(tmp_path / "sae", saelens_tensors("standard"), v6_cfg("standard"))
    with pytest.raises(
        ModelLoadError,
        match=r"trained on 'blocks\.3\.hook_resid_post' \(engine layer 3\) but layer 1",
    ):
        load_sae(path, layer=1)
    assert load_sae(path, layer=3).layer == 3


def test_unrecognised_directory_and_goodfire_missing_tensor(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot tell which SAE format"):
        load_sae(tmp_path / "empty")
    save_file({"encoder_linear.weight": rand(N, D)}, str(tmp_path / "g.safetensors"))
    with pytest.raises(
        ModelLoadError, match=r"g\.safetensors: tensor 'encoder_linear\.bias' is missing"
    ):
        load_sae(tmp_path / "g.safetensors", layer=0)
    with pytest.raises(ModelLoadError, match="SAE not found"):
        load_sae(tmp_path / "nope")


def test_gemmascope_wrong_threshold_shape(tmp_path):
    t = {
        "W_enc": rand(D, N),
        "b_enc": rand(N),
        "W_dec": rand(N, D),
        "b_dec": rand(D),
        "threshold": rand(N - 1),
    }
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in t.items()})
    with pytest.raises(
        ModelLoadError, match=r"params\.npz: tensor 'threshold' has shape \[47\], expected \[48\]"
    ):
        load_sae(tmp_path, layer=0)


# -- hook names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hook, layer",
    [
        ("blocks.0.hook_resid_post", 0),
        ("blocks.12.hook_resid_post", 12),
        ("blocks.1.hook_resid_pre", 0),
        ("blocks.12.hook_resid_pre", 11),
        ("layers.7", 7),
        ("model.layers.7", 7),
    ],
)
def test_layer_for_hook(hook, layer):
    assert layer_for_hook(hook) == layer


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.3.hook_resid_mid",
        "blocks.3.attn.hook_z",
        "blocks.3.hook_mlp_out",
        "hook_embed",
        "blocks.0.hook_resid_pre",
    ],
)
def test_unsupported_hooks_are_refused(hook):
    with pytest.raises(ModelLoadError, match=hook.replace(".", r"\.") + "|embedding"):
        layer_for_hook(hook)
