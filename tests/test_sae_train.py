"""SAE training: it learns, it is deterministic, and what it saves loads back through guard's loader."""

from __future__ import annotations

import json
import re

import pytest
import torch

from guard.sae.formats import load_sae
from guard.sae.train import SaeTrainConfig, sae_stats, train_sae
from guard.testing import make_random_llama


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_data(
    n: int = 4000, d: int = 16, n_atoms: int = 32, active: int = 3, seed: int = 0
) -> torch.Tensor:
    """Tokens that are sums of a few of ``n_atoms`` random directions, plus an offset: SAE-shaped data."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    codes = torch.zeros(n, n_atoms)
    idx = torch.rand(n, n_atoms, generator=g).topk(active, dim=1).indices
    codes.scatter_(1, idx, torch.rand(n, active, generator=g) * 3 + 0.5)
    return codes @ atoms + 5.0


@pytest.mark.parametrize("kind", [{"k": 4}, {"l1": 0.01}])
def test_training_reduces_reconstruction_error(kind):
    x = sparse_data()
    res = train_sae(
        x[:3500],
        SaeTrainConfig(d_sae=64, steps=400, batch_size=256, lr=3e-3, **kind),
        eval_x=x[3500:],
    )
    assert res.final.mse < 0.2 * res.initial.mse and res.final.fve > 0.8
    assert res.final.tokens == 500 and 0.0 <= res.dead_frac_train < 0.5
    if "k" in kind:
        assert res.final.l0 <= 4 and res.sae.activation == "topk"
        torch.testing.assert_close(
            res.sae.W_dec.norm(dim=1), torch.full((64,), float(res.sae.W_dec.norm(dim=1)[0]))
        )
    else:
        assert res.sae.activation == "relu" and res.final.l0 < 64


def test_training_is_deterministic_for_a_seed():
    x = sparse_data(1000)
    cfg = SaeTrainConfig(d_sae=32, k=4, steps=60, batch_size=128)
    a, b = train_sae(x, cfg).sae, train_sae(x, cfg).sae
    other = train_sae(x, SaeTrainConfig(d_sae=32, k=4, steps=60, batch_size=128, seed=1)).sae
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert not torch.equal(a.W_enc, other.W_enc)


def test_the_scale_is_folded_into_raw_space_weights():
    """Stats of the returned SAE on raw inputs are what training saw on scaled inputs."""
    x = sparse_data(1000) * 40.0  # a large activation scale must not matter
    res = train_sae(x, SaeTrainConfig(d_sae=64, k=4, steps=300, batch_size=256, lr=3e-3))
    assert res.final.fve > 0.8
    assert sae_stats(res.sae, x).fve == pytest.approx(res.final.fve)
    assert res.sae.normalize == "none" and res.sae.apply_b_dec_to_input


def test_config_names_the_conflict():
    with pytest.raises(ValueError, match="exactly one of k"):
        SaeTrainConfig(d_sae=8, k=2, l1=0.1)
    with pytest.raises(ValueError, match=re.escape("k must be in 1..d_sae")):
        SaeTrainConfig(d_sae=8, k=9)


def test_cli_trains_saves_saelens_and_loads_identically(tmp_path, capsys):
    from guard.cli import main
    from guard.engine.transformers_engine import TransformersEngine
    from guard.probe.collect import collect
    from guard.probe.data import read_jsonl

    model = make_random_llama(tmp_path / "m", layers=2)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"hello {i}",
                    "completion": "the quick brown fox " * (1 + i % 3),
                    "label": i % 2,
                }
            )
            + "\n"
            for i in range(30)
        )
    )
    out = tmp_path / "sae"
    rc = main(
        [
            "sae",
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--layer",
            "1",
            "--d-sae",
            "96",
            "--k",
            "8",
            "--steps",
            "150",
            "--out",
            str(out),
            "--quiet",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "FVE" in printed and "dead latents" in printed
    cfg = json.loads((out / "cfg.json").read_text())
    assert (
        cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["architecture"] == "topk"
    )
    assert cfg["metadata"]["guard_training"]["steps"] == 150
    trained = cfg["metadata"]["guard_training"]["heldout"]
    loaded = load_sae(out)
    assert loaded.layer == 1 and loaded.k == 8
    engine = TransformersEngine.load(model)
    x = collect(engine, read_jsonl(data), [1], progress=False, span="all").hidden[1]
    stats = sae_stats(loaded, x)
    assert stats.fve > 0.3 and trained["fve"] > 0.3
    # a second run with the same seed (activations now from the cache) saves an identical SAE
    rc = main(
        [
            "sae",
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--layer",
            "1",
            "--d-sae",
            "96",
            "--k",
            "8",
            "--steps",
            "150",
            "--out",
            str(tmp_path / "sae2"),
            "--quiet",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 0
    again = load_sae(tmp_path / "sae2")
    torch.testing.assert_close(again.encode(x), loaded.encode(x), rtol=0, atol=0)


def test_saved_sae_encodes_identically_after_load(tmp_path):
    from guard.sae.formats import save_saelens

    x = sparse_data(800)
    for kind in ({"k": 4}, {"l1": 0.01}):
        sae = train_sae(
            x,
            SaeTrainConfig(d_sae=32, steps=50, batch_size=128, **kind),
            layer=3,
            hook_name="blocks.3.hook_resid_post",
        ).sae
        out = save_saelens(
            sae, tmp_path / str(kind), model_name="m", hook_name="blocks.3.hook_resid_post"
        )
        loaded = load_sae(out)
        assert loaded.layer == 3 and loaded.activation == sae.activation
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(
            loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), rtol=0, atol=0
        )


def test_cli_defaults_to_the_middle_layer_and_a_width_from_d_model(tmp_path, capsys):
    from guard.cli import main
    from guard.sae_cli import DEFAULT_EXPANSION, DEFAULT_K

    model = make_random_llama(tmp_path / "m", hidden=16, layers=4)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"hi {i}", "completion": "a b c " * (1 + i % 2), "label": i % 2})
            + "\n"
            for i in range(10)
        )
    )
    out = tmp_path / "sae"
    rc = main(
        [
            "sae",
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--steps",
            "5",
            "--out",
            str(out),
            "--quiet",
            "--no-cache",
        ]
    )
    assert rc == 0 and "layer 2 (blocks.2.hook_resid_post)" in capsys.readouterr().out
    loaded = load_sae(out)
    assert loaded.layer == 2 and loaded.d_in == 16
    assert loaded.d_sae == DEFAULT_EXPANSION * 16 and loaded.k == DEFAULT_K
