"""Tokenizers for the model organisms, saved in Hugging Face format.

Two kinds, chosen by a :class:`ChatFormat`: :data:`FIRST_FORMAT` (byte-level BPE, the first
organism) and :data:`SECOND_FORMAT` (word level: one token per word, ``▁``-prefixed after a space,
or per punctuation mark; a ChatML-like template; no reset or reserved tokens; the second organism).

Contract of the byte-level kind (:data:`FIRST_FORMAT`):

- Byte-level (ByteLevel pre-tokenizer and decoder, all 256 byte symbols in the alphabet), no
  normaliser: ``decode(encode(s)) == s`` for every UTF-8 string ``s`` that contains no special
  token text.
- Special tokens have fixed ids, in the order of :data:`SPECIAL_TOKENS` (``<|bos|>`` = 0, ...).
- Chat format: ``<|bos|>`` then per message ``<|role|>content<|end|>``, except that an assistant
  turn ends with ``<|eos|>`` so generation stops there; the generation prompt is ``<|assistant|>``.
- ``AutoTokenizer.from_pretrained(dir)`` loads it and ``apply_chat_template`` works.

Contract of the word-level kind (:data:`SECOND_FORMAT`): newlines and punctuation marks are split
off as their own tokens and spaces become ``▁`` word prefixes (never prepended), so encoding the pieces of a chat
between special tokens one by one gives the same ids as encoding the whole rendered chat;
``decode(encode(s)) == s`` for text over the training alphabet; characters outside it are
``<unk>``. Chat format: per message ``<|im_start|>role\ncontent<|im_end|>``, generation prompt
``<|im_start|>assistant\n``; ``<|im_end|>`` is also the end-of-sequence token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    EOS,
    PAD,
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    END,
    "<|reset|>",
    "<|think|>",
    "<|/think|>",
    *(f"<|reserved_{i}|>" for i in range(8)),
)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """Tokenizer kind, special tokens and chat template of one organism."""

    kind: Literal["bytelevel-bpe", "wordlevel"]
    special_tokens: tuple[str, ...]
    """Added first, in this order, so their ids are fixed (0, 1, ...)."""
    bos: str | None
    eos: str
    pad: str
    unk: str | None
    chat_template: str

    def __post_init__(self) -> None:
        named = [t for t in (self.bos, self.eos, self.pad, self.unk) if t is not None]
        missing = [t for t in named if t not in self.special_tokens]
        if missing:
            raise ValueError(f"ChatFormat: {missing} must be listed in special_tokens")
        if self.kind == "wordlevel" and self.unk is None:
            raise ValueError("ChatFormat: a word-level tokenizer needs an unk token")

    @property
    def additional(self) -> list[str]:
        """Special tokens other than bos, eos, pad and unk."""
        return [t for t in self.special_tokens if t not in (self.bos, self.eos, self.pad, self.unk)]


FIRST_FORMAT = ChatFormat("bytelevel-bpe", SPECIAL_TOKENS, BOS, EOS, PAD, None, CHAT_TEMPLATE)

SECOND_FORMAT = ChatFormat(
    "wordlevel",
    ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    None,
    "<|im_end|>",
    "<|endoftext|>",
    "<unk>",
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1536, fmt: ChatFormat = FIRST_FORMAT
) -> Tokenizer:
    """Train a tokenizer of ``fmt``'s kind on ``texts``; special tokens first so their ids are fixed."""
    if fmt.kind == "wordlevel":
        return _train_wordlevel(texts, vocab_size, fmt)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_wordlevel(texts: Iterable[str], vocab_size: int, fmt: ChatFormat) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token=fmt.unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never"),
            pre_tokenizers.Split(Regex("[^\\w\u2581]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(fmt.special_tokens),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def to_hf(tok: Tokenizer, fmt: ChatFormat = FIRST_FORMAT) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer with ``fmt``'s special tokens and chat template."""
    named = {"bos_token": fmt.bos, "eos_token": fmt.eos, "pad_token": fmt.pad, "unk_token": fmt.unk}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in named.items() if v is not None},
        additional_special_tokens=fmt.additional,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = fmt.chat_template
    return hf


def save(hf: PreTrainedTokenizerFast, out_dir: str | Path, fmt: ChatFormat = FIRST_FORMAT) -> None:
    """``save_pretrained`` and make sure ``tokenizer_config.json`` itself carries the chat template
    (newer transformers writes it to ``chat_template.jinja`` only; older readers look here)."""
    out = Path(out_dir)
    hf.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = fmt.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    smap = out / "special_tokens_map.json"
    if not smap.exists():
        named = {
            "bos_token": fmt.bos,
            "eos_token": fmt.eos,
            "pad_token": fmt.pad,
            "unk_token": fmt.unk,
        }
        smap.write_text(
            json.dumps(
                {
                    **{k: v for k, v in named.items() if v is not None},
                    "additional_special_tokens": fmt.additional,
                },
                indent=2,
            )
            + "\n"
        )
