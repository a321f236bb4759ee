"""The reset id the vLLM engine forces, chosen from config and tokenizer alone, and its report in
``guard policy check``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from guard.engine.reset_id import choose_reset_id
from guard.errors import ModelLoadError
from tests.conftest import ORGANISM, REPO


def _copy(tmp_path, vocab_size=None, pad=None):
    """A copy of the organism's config and tokenizer (no weights: the choice never needs them)."""
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (ORGANISM / f).exists():
            shutil.copy(ORGANISM / f, d / f)
    cfg = json.loads((d / "config.json").read_text())
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_order_of_choice(tmp_path):
    assert choose_reset_id(ORGANISM) == (7, "reset token", "<|reset|>")
    assert choose_reset_id(ORGANISM, reset_token_id=12).kind == "policy"
    with pytest.raises(ModelLoadError, match="outside"):
        choose_reset_id(ORGANISM, reset_token_id=1536)
    # no reset token by that name: a reserved special token, never the eos/bos/pad ids
    assert choose_reset_id(ORGANISM, "<|nope|>") == (10, "reserved special token", "<|reserved_0|>")
    # padded embeddings: the first row no text tokenizes to
    padded = _copy(tmp_path, vocab_size=1600)
    choice = choose_reset_id(padded, "<|nope|>")
    assert (choice.token_id, choice.kind) == (1536, "spare embedding row") and choice.banned
    assert not choose_reset_id(padded).banned  # the model's own reset token is never banned


def test_padding_id_then_a_loud_error(tmp_path):
    tok = AutoTokenizer.from_pretrained(ORGANISM)
    vocab = {k: v for k, v in tok.get_vocab().items() if "reserved" not in k}

    class NoReserved:  # the organism's tokenizer seen without its reserved tokens
        eos_token_id, bos_token_id, unk_token_id = tok.eos_token_id, tok.bos_token_id, None
        pad_token_id, pad_token = tok.pad_token_id, tok.pad_token
        all_special_tokens = tuple(t for t in tok.all_special_tokens if "reserved" not in t)

        def get_vocab(self):
            return vocab

        def get_added_vocab(self):
            return {k: v for k, v in tok.get_added_vocab().items() if "reserved" not in k}

        def __len__(self):
            return len(tok)

    assert choose_reset_id(ORGANISM, "<|nope|>", tokenizer=NoReserved()) == (
        2,
        "padding id",
        "<|pad|>",
    )
    NoReserved.pad_token_id = tok.eos_token_id
    with pytest.raises(ModelLoadError, match="reset_token_id"):
        choose_reset_id(ORGANISM, "<|nope|>", tokenizer=NoReserved())


def test_policy_check_reports_the_reset_id(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        f"name: p\nmodel: {{engine: vllm, path: {ORGANISM}, vllm: {{reset_token: '<|nope|>'}}}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "guard.cli", "policy", "check", str(policy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "vllm reset: id 10 (reserved special token: <|reserved_0|>)" in out.stdout
    policy.write_text(
        f"name: p\nmodel: {{engine: vllm, path: {ORGANISM}, vllm: {{reset_token_id: 99999}}}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "guard.cli", "policy", "check", str(policy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        out.returncode == 2
        and "vllm reset: model.vllm.reset_token_id 99999 is outside" in out.stderr
    )
