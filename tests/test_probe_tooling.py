"""Probe tooling: the activation cache, pooled training, calibration files, and the PNG histogram."""

from __future__ import annotations

import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch

from guard.cli import main as guard_main
from guard.engine.transformers_engine import TransformersEngine
from guard.probe.cache import ActivationCache
from guard.probe.collect import collect
from guard.probe.data import read_jsonl
from guard.probe.png import NEG_COLOUR, POS_COLOUR, THRESHOLD_COLOUR, encode_png, histogram_image
from guard.probe.train import TrainConfig, train_probe
from guard.testing import make_random_llama

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "there",
    "how",
    "are",
    "you",
    "today",
    "fine",
    "thank",
]
MARKER = "zebra"


def _rows(n: int, seed: int, marker_every: int = 2) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 9))]
        label = int(i % marker_every == 1)
        if label:
            words.insert(rng.randrange(len(words)), MARKER)
        rows.append(
            {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
                "completion": " ".join(words),
                "label": label,
            }
        )
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tooling")
    model = make_random_llama(d / "m", layers=2)
    yield {
        "model": model,
        "engine": TransformersEngine.load(model),
        "train": _write(d / "train.jsonl", _rows(160, 1)),
        "calib": _write(
            d / "calib.jsonl", [r | {"label": 0} for r in _rows(100, 3, marker_every=10**6)]
        ),
        "dir": d,
    }
    torch.set_num_threads(n)


class CountingEngine:
    """The real engine, counting its teacher-forced forward passes."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0
        self.info, self.tokenizer = engine.info, engine.tokenizer

    def hidden_states(self, ids, layers):
        self.calls += 1
        return self.engine.hidden_states(ids, layers)


# -- cache ------------------------------------------------------------------------------------


def test_cache_hit_skips_the_model_and_returns_the_same_activations(setup, tmp_path):
    eng = CountingEngine(setup["engine"])
    rows = read_jsonl(setup["train"])[:20]
    cache = ActivationCache(tmp_path / "cache", setup["model"])
    first = collect(eng, rows, [0, 1], progress=False, cache=cache)
    assert eng.calls == 20 and cache.misses == 1 and len(list((tmp_path / "cache").iterdir())) == 1
    again = collect(
        eng, rows, [0, 1], progress=False, cache=ActivationCache(tmp_path / "cache", setup["model"])
    )
    assert eng.calls == 20  # no forward pass on a hit
    for layer in (0, 1):
        torch.testing.assert_close(again.hidden[layer], first.hidden[layer], rtol=0, atol=0)
    np.testing.assert_array_equal(again.row, first.row)
    np.testing.assert_array_equal(again.token_ids, first.token_ids)
    # other layers, other rows, other span: misses
    collect(eng, rows, [1], progress=False, cache=cache)
    collect(eng, rows[:10], [0, 1], progress=False, cache=cache)
    collect(eng, rows, [0, 1], progress=False, cache=cache, span="all")
    assert eng.calls == 20 + 20 + 10 + 20


def test_cache_key_changes_when_the_weights_change(setup, tmp_path):
    rows = read_jsonl(setup["train"])[:3]
    before = ActivationCache(tmp_path, setup["model"]).key(rows, [0], "completion")
    weights = setup["model"] / "model.safetensors"
    st = weights.stat()
    import os

    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert ActivationCache(tmp_path, setup["model"]).key(rows, [0], "completion") != before
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_span_all_keeps_prompt_tokens_and_marks_the_completion(setup):
    rows = read_jsonl(setup["train"])[:4]
    comp = collect(setup["engine"], rows, [1], progress=False)
    full = collect(setup["engine"], rows, [1], progress=False, span="all")
    assert full.n_tokens > comp.n_tokens and int(full.completion.sum()) == comp.n_tokens
    torch.testing.assert_close(full.completion_only().hidden[1], comp.hidden[1])


# -- pooled training and calibration -----------------------------------------------------------


@pytest.mark.parametrize("pooling,min_auroc", [("mean", 0.9), ("last", 0.75)])
def test_pooled_training_fits_one_vector_per_row(setup, pooling, min_auroc):
    # the last token of a random-weight model sees the marker only through attention: weaker, not absent
    res = train_probe(
        setup["engine"],
        [setup["train"]],
        layers=[1],
        config=TrainConfig(pooling=pooling),
        progress=False,
    )
    meta = res.monitor.meta
    assert meta["pooling"] == pooling and meta["metrics"]["heldout"]["auroc"] > min_auroc


def test_pooled_vectors_are_row_means_and_last_tokens(setup):
    acts = collect(setup["engine"], read_jsonl(setup["train"])[:5], [0], progress=False)
    mean, last = acts.pooled(0, "mean"), acts.pooled(0, "last")
    for r in range(5):
        h = acts.hidden[0][torch.from_numpy(np.flatnonzero(acts.row == r))]
        torch.testing.assert_close(mean[r], h.mean(0))
        torch.testing.assert_close(last[r], h[-1])


def test_cli_calibration_file_sets_the_threshold(setup, tmp_path, capsys):
    out = tmp_path / "p"
    rc = guard_main(
        [
            "probe",
            "train",
            "--model",
            str(setup["model"]),
            "--data",
            str(setup["train"]),
            "--layer",
            "1",
            "--calibration",
            str(setup["calib"]),
            "--target-fpr",
            "0.05",
            "--pooling",
            "mean",
            "--out",
            str(out),
            "--quiet",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    meta = json.loads((out / "probe.json").read_text())
    cal = meta["metrics"]["calibration"]
    assert (
        cal["source"] == [str(setup["calib"])]
        and cal["negatives"] == 100
        and cal["fpr_at_threshold"] <= 0.05
    )
    assert meta["pooling"] == "mean" and "pooling mean" in capsys.readouterr().out


# -- PNG ------------------------------------------------------------------------------------------


def _decode(png: bytes) -> tuple[dict, bytes]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", png[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF
        chunks.append((kind, data))
        pos += 12 + n
    assert next(k for k, _ in chunks) == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, colour, _comp, _filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    idat = zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT"))
    return {"w": w, "h": h, "depth": depth, "colour": colour, "interlace": interlace}, idat


def test_png_round_trips_pixels():
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    head, raw = _decode(encode_png(img))
    assert head == {"w": 5, "h": 7, "depth": 8, "colour": 2, "interlace": 0}
    rows = np.frombuffer(raw, np.uint8).reshape(7, 1 + 5 * 3)
    assert (rows[:, 0] == 0).all()
    np.testing.assert_array_equal(rows[:, 1:].reshape(7, 5, 3), img)
    grey_head, grey = _decode(encode_png(img[:, :, 0]))
    assert grey_head["colour"] == 0 and len(grey) == 7 * (1 + 5)
    with pytest.raises(ValueError):
        encode_png(img.astype(np.float32))


def test_histogram_draws_both_classes_and_the_threshold():
    scores = np.r_[np.full(50, 0.1), np.full(50, 0.9)]
    labels = np.r_[np.zeros(50), np.ones(50)]
    img = histogram_image(scores, labels, threshold=0.5, width=200, height=100)
    assert img.shape == (100, 200, 3) and img.dtype == np.uint8
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert {NEG_COLOUR, POS_COLOUR, THRESHOLD_COLOUR} <= colours
    neg_cols = np.flatnonzero((img == NEG_COLOUR).all(-1).any(0))
    pos_cols = np.flatnonzero((img == POS_COLOUR).all(-1).any(0))
    thr_cols = np.flatnonzero((img == THRESHOLD_COLOUR).all(-1).any(0))
    assert neg_cols.max() < thr_cols.min() <= thr_cols.max() < pos_cols.min()


def test_cli_eval_writes_a_png(setup, tmp_path, capsys):
    probe = tmp_path / "p"
    args = ["--model", str(setup["model"]), "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert (
        guard_main(
            [
                "probe",
                "train",
                *args,
                "--data",
                str(setup["train"]),
                "--layer",
                "1",
                "--out",
                str(probe),
            ]
        )
        == 0
    )
    png = tmp_path / "h.png"
    assert (
        guard_main(
            ["probe", "eval", str(probe), *args, "--data", str(setup["train"]), "--png", str(png)]
        )
        == 0
    )
    head, raw = _decode(png.read_bytes())
    assert head["w"] > 0 and len(raw) == head["h"] * (1 + 3 * head["w"])
    assert "AUROC" in capsys.readouterr().out
