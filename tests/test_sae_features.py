"""Feature search: a planted feature is found, thresholds hold the FPR, the stanza is a valid policy entry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from guard.policy import load_policy
from guard.probe.collect import Activations
from guard.sae import features as F
from guard.sae.formats import save_saelens
from guard.sae.model import Sae
from guard.testing import make_random_llama

PLANTED = 5


def identity_sae(d: int = 8, activation: str = "relu", k: int | None = None, layer: int = 0) -> Sae:
    eye = torch.eye(d)
    return Sae(
        W_enc=eye.clone(),
        b_enc=torch.zeros(d),
        W_dec=eye.clone(),
        b_dec=torch.zeros(d),
        activation=activation,
        k=k,
        layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post",
    )


def planted_acts(n_rows: int = 200, d: int = 8, seed: int = 0) -> Activations:
    """Rows of 3-7 tokens; feature ``PLANTED`` is 2.0 on one token of each label-1 row and 0 elsewhere,
    the other features are random noise unrelated to the label."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n_rows) % 2).astype(np.int64)
    hs, rows, ids = [], [], []
    for r in range(n_rows):
        n = int(rng.integers(3, 8))
        h = rng.uniform(-1, 1, (n, d)).astype(np.float32)
        h[:, PLANTED] = -1.0
        if labels[r]:
            h[int(rng.integers(n)), PLANTED] = 2.0
        hs.append(h)
        rows.append(np.full(n, r))
        ids.append(np.arange(n))
    return Activations(
        {0: torch.from_numpy(np.concatenate(hs))}, np.concatenate(rows), labels, np.concatenate(ids)
    )


def test_ranking_finds_the_planted_feature():
    acts = planted_acts()
    row_max, rate = F.row_max_acts(identity_sae(), acts, 0)
    ranked = F.rank_features(row_max, acts.labels, rate)
    assert ranked[0].index == PLANTED and ranked[0].auroc == 1.0
    assert ranked[0].mean_pos == pytest.approx(2.0) and ranked[0].mean_neg == 0.0
    assert all(r.auroc < 0.75 for r in ranked[1:])
    assert ranked[0].firing_rate == pytest.approx(100 / len(acts.row))


def test_row_max_matches_a_naive_loop():
    acts = planted_acts(20)
    sae = identity_sae(activation="topk", k=2)
    row_max, _ = F.row_max_acts(sae, acts, 0, chunk=7)
    f = F.monitor_feature_acts(sae, acts.hidden[0]).numpy()
    naive = np.stack([f[acts.row == r].max(0) for r in range(20)])
    np.testing.assert_array_equal(row_max, naive)


def test_topk_features_are_scored_as_the_monitor_scores_them():
    from guard.sae.monitor import SaeFeatureMonitor

    sae = identity_sae(activation="topk", k=1)
    x = torch.randn(50, 8)
    mon = SaeFeatureMonitor("m", sae, [(i, 1.0) for i in range(8)])
    torch.testing.assert_close(F.monitor_feature_acts(sae, x), mon.feature_acts(x))


def test_joint_thresholds_keep_the_union_fpr_at_or_below_target():
    rng = np.random.default_rng(1)
    neg = rng.exponential(size=(500, 4))
    thr, fpr = F.joint_thresholds(neg, 0.02)
    union = float((neg > thr).any(axis=1).mean())
    assert union == fpr and fpr <= 0.02 and fpr > 0.01
    assert (thr >= F.MIN_THRESHOLD).all()
    zeros, _ = F.joint_thresholds(np.zeros((10, 2)), 0.01)
    assert (zeros == F.MIN_THRESHOLD).all()


def test_top_examples_mark_the_peak_token():
    acts = planted_acts(10)
    ex = F.top_examples(identity_sae(), acts, 0, PLANTED, lambda t: f"<{t}>", n=3, window=1)
    assert len(ex) == 3 and all(e.label == 1 and e.activation == 2.0 for e in ex)
    for e in ex:
        peak = int(
            acts.token_ids[acts.row == e.row][
                F.monitor_feature_acts(
                    identity_sae(), acts.hidden[0][torch.from_numpy(acts.row == e.row)]
                )[:, PLANTED].argmax()
            ]
        )
        assert f"[[<{peak}>]]" in e.text


def test_stanza_validates_as_a_policy_monitor(tmp_path):
    make_random_llama(tmp_path / "m", layers=2, hidden=8, heads=2)
    sae_dir = save_saelens(
        identity_sae(layer=1),
        tmp_path / "sae",
        model_name="m",
        hook_name="blocks.1.hook_resid_post",
    )
    policies = tmp_path / "policies"
    policies.mkdir()
    entry = F.stanza(
        "harm-sae", sae_dir, 1, [PLANTED, 2], np.array([0.5, 1e-9]), relative_to=policies
    )
    text = F.stanza_yaml(entry, "found by a test")
    assert text.startswith("# found by a test\n") and yaml.safe_load(text)[0]["path"] == "../sae"
    policy_text = "name: p\nmodel: {path: ../m}\nmonitors:\n" + "".join(
        f"  {line}\n" for line in text.splitlines()
    )
    (policies / "p.yaml").write_text(policy_text)
    policy = load_policy(policies / "p.yaml")
    spec = policy.monitors[0]
    assert spec.kind == "sae" and spec.layer == 1 and spec.rule == "any"
    assert [(f.index, f.threshold) for f in spec.features] == [(PLANTED, 0.5), (2, 1e-9)]


def test_cli_features_prints_the_table_and_writes_a_loadable_stanza(tmp_path, capsys):
    from guard.cli import main
    from guard.service import GuardService

    torch.set_num_threads(1)
    model = make_random_llama(tmp_path / "m", layers=2)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": "hi",
                    "completion": ("zebra " if i % 2 else "") + "the fox " * 3,
                    "label": i % 2,
                }
            )
            + "\n"
            for i in range(40)
        )
    )
    common = ["--model", str(model), "--quiet", "--cache-dir", str(tmp_path / "c")]
    assert (
        main(
            [
                "sae",
                "train",
                *common,
                "--data",
                str(data),
                "--layer",
                "1",
                "--d-sae",
                "64",
                "--l1",
                "0.01",
                "--steps",
                "100",
                "--out",
                str(tmp_path / "sae"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    stanza = tmp_path / "pol" / "mon.yaml"
    assert (
        main(
            [
                "sae",
                "features",
                *common,
                "--sae",
                str(tmp_path / "sae"),
                "--data",
                str(data),
                "--top",
                "5",
                "--examples",
                "2",
                "--watch",
                "2",
                "--out-stanza",
                str(stanza),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        out.splitlines()[1].split()[:2] == ["feature", "AUROC"]
        and "[[" in out
        and "rule any over" in out
    )
    (stanza.parent / "p.yaml").write_text(
        "name: p\nmodel: {path: ../m}\nmonitors:\n"
        + "".join(f"  {line}\n" for line in stanza.read_text().splitlines())
    )
    service = GuardService.from_policy_files([stanza.parent / "p.yaml"])
    try:
        # the organism's own <|reset|> acts too, as it does for every policy that lists no reset_token
        names = [b.monitor.name for b in service.resolve("p").monitors]
        assert names == ["sae-features", "native_reset"]
    finally:
        service.close()
