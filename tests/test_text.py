"""Incremental release decoding (guard.controller.text) against the full decode it replaces, on the
organisms' tokenizers (byte-level BPE; WordLevel with Metaspace) and a SentencePiece-style BPE with
byte fallback, with unicode text, random ids (broken characters) and rollbacks."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from guard.controller.text import IncrementalText, TextTracker
from guard.engine.transformers_engine import HFChatTokenizer
from tests.conftest import REPO

TEXTS = [
    "Hello there, how are you today? Fine, thanks.",
    "naïve café — déjà vu; ½ of 日本語のテキスト is 中文 too. Ünïcödé 🙂🚀 ok!",
    "  leading spaces,\ttabs\nand newlines\n\n  indent  and trailing   ",
    "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷 math ∑∫√ arrows ←→ quotes “” «»",
]


def _byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (Metaspace, byte fallback, Llama-2 decoder) trained on ASCII only,
    so every non-ASCII character decodes from ``<0xNN>`` byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    trained.train_from_iterator(["hello there how are you today fine thanks spaces"] * 8, trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module", params=["organism", "organism2", "byte-fallback"])
def tok(request):
    if request.param == "byte-fallback":
        return _byte_fallback_tokenizer()
    return AutoTokenizer.from_pretrained(REPO / "models" / request.param)


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _token_lists(tok, rng: random.Random) -> list[list[int]]:
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    vocab = len(tok)
    noisy = [rng.randrange(vocab) for _ in range(300)]  # broken characters, special tokens
    mixed = [i for ids in encoded for i in ids]
    spliced = [i for ids in encoded for i in (ids + [rng.randrange(vocab) for _ in range(5)])]
    return [*encoded, noisy, mixed, spliced]


def test_incremental_text_equals_full_decode(tok):
    rng = random.Random(0)
    decode = _decode(tok)
    for ids in _token_lists(tok, rng):
        inc = IncrementalText(decode)
        n = 0
        while n < len(ids):
            n = min(len(ids), n + rng.choice([1, 1, 1, 2, 5]))
            assert inc.text(ids, n) == decode(ids[:n]), (ids[:n], n)


def test_incremental_text_after_rollbacks(tok):
    """A list cut back and regrown differently (a rollback and a resample) decodes like a fresh one."""
    rng = random.Random(1)
    decode = _decode(tok)
    pool = [i for ids in _token_lists(tok, rng) for i in ids]
    inc = IncrementalText(decode)
    ids: list[int] = []
    for _ in range(400):
        if ids and rng.random() < 0.08:
            del ids[rng.randrange(len(ids)) :]
        else:
            ids.append(rng.choice(pool))
        n = rng.randint(max(0, len(ids) - 3), len(ids))
        assert inc.text(ids, n) == decode(ids[:n])


class _NaiveTracker(TextTracker):
    """The release rule on a full decode of the released prefix (what the incremental one replaces)."""

    def release(self, output, n):
        text = self.text_of(output[:n]).rstrip("\ufffd")
        text = text[: len(text) - self._stop_prefix_len(text)]
        if len(text) <= len(self.sent_text) or not text.startswith(self.sent_text):
            return None
        delta = (text[len(self.sent_text) :], tuple(output[self.sent_tokens : n]))
        self.sent_text, self.sent_tokens = text, n
        return delta


@pytest.mark.parametrize("stop", [(), ("you", "🚀", "\n\n")])
def test_release_matches_full_decode(tok, stop):
    """Token by token, with hold-back and retractions as the controller does them, the released
    deltas are those of the full-decode rule, and stop strings are found where a full decode has them."""
    rng = random.Random(2)
    chat = HFChatTokenizer.__new__(HFChatTokenizer)
    chat.tok = tok
    for ids in _token_lists(tok, rng):
        fast, naive = TextTracker(chat, stop), _NaiveTracker(chat, stop)
        output: list[int] = []
        for i, t in enumerate(ids):
            output.append(t)
            if (
                i % 37 == 36
            ):  # a retraction to a safe point, as GuardedGeneration._retract_to does it
                point = rng.randrange(len(output))
                del output[point:]
                for tr in (fast, naive):
                    if tr.sent_tokens > point:
                        tr.sent_text, tr.sent_tokens = tr.text_of(output), point
            n = max(0, len(output) - rng.choice([0, 0, 2]))
            got = fast.release(output, n)
            assert (None if got is None else (got.text, got.token_ids)) == naive.release(output, n)
            assert fast.sent_text == naive.sent_text and fast.sent_tokens == naive.sent_tokens
            whole = chat.decode(output)
            hits = [i for i in (whole.find(s) for s in stop) if i >= 0]
            assert fast.stop_index(output) == (min(hits) if hits else None)


def test_incremental_text_decodes_a_window_per_token(tok):
    """The point of it: a step decodes a few tokens, not the whole answer (linear, not quadratic)."""
    decode, decoded = _decode(tok), []

    def counting(ids):
        decoded.append(len(ids))
        return decode(ids)

    ids = tok(" ".join(TEXTS[:1] * 40), add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    inc = IncrementalText(counting)
    for n in range(1, len(ids) + 1):
        assert inc.text(ids, n) == decode(ids[:n])
    assert sum(decoded) < 8 * IncrementalText.window * len(ids)


def _cleanup(text: str) -> str:
    """HF's ``clean_up_tokenization`` (spaces before punctuation and contractions)."""
    for a, b in [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'")]:
        text = text.replace(a, b)
    for c in ("n't", "'m", "'s", "'ve", "'re"):
        text = text.replace(" " + c, c)
    return text


def test_incremental_text_counts_its_context_in_characters():
    """Skipped special tokens decode to nothing: a context of six of them shows no text, and a
    clean-up rule that reads the characters before a token (" n't" -> "n't") must still see them."""
    tok = AutoTokenizer.from_pretrained(REPO / "models" / "organism")
    special = tok.convert_tokens_to_ids("<|think|>")

    def decode(ids: list[int]) -> str:
        return _cleanup(tok.decode(ids, skip_special_tokens=True))

    def ids_of(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    head = ids_of("x y z w v u t s r q p o") + ids_of("do") + ids_of(" ")
    ids = head + ids_of("n") + [special] * 5 + ids_of("'t")
    inc = IncrementalText(decode)
    inc.text(ids, 10)
    inc.text(ids, len(ids) - 1)  # a jump: the context is re-taken at the five specials
    assert inc.text(ids, len(ids)) == decode(ids) and decode(ids).endswith("don't")
    rng = random.Random(0)
    words = ["do", " n", "n", "'t", " '", " .", " ,", " ?", " 's", " ", "a", " a", "'m", " x"]
    pool = sorted({i for w in words for i in ids_of(w)} | {special})
    for _ in range(200):
        ids = [rng.choice(pool) for _ in range(40)]
        inc, n = IncrementalText(decode), 0
        while n < len(ids):
            n = min(len(ids), n + rng.choice([1, 1, 2, 7]))
            assert inc.text(ids, n) == decode(ids[:n]), ids[:n]
