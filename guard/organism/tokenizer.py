"""Byte-level BPE tokenizer for the model organism, saved in Hugging Face format.

Contract:

- Byte-level (ByteLevel pre-tokenizer and decoder, all 256 byte symbols in the alphabet), no
  normaliser: ``decode(encode(s)) == s`` for every UTF-8 string ``s`` that contains no special
  token text.
- Special tokens have fixed ids, in the order of :data:`SPECIAL_TOKENS` (``<|bos|>`` = 0, ...).
- Chat format: ``<|bos|>`` then per message ``<|role|>content<|end|>``, except that an assistant
  turn ends with ``<|eos|>`` so generation stops there; the generation prompt is ``<|assistant|>``.
- ``AutoTokenizer.from_pretrained(dir)`` loads it and ``apply_chat_template`` works.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", END, "<|reset|>", "<|think|>",
    "<|/think|>", *(f"<|reserved_{i}|>" for i in range(8)),
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


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1536) -> Tokenizer:
    """Train byte-level BPE on ``texts``; special tokens are added first so their ids are fixed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def to_hf(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer with the organism's special tokens and chat template."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        model_max_length=512, clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save(hf: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """``save_pretrained`` and make sure ``tokenizer_config.json`` itself carries the chat template
    (newer transformers writes it to ``chat_template.jinja`` only; older readers look here)."""
    out = Path(out_dir)
    hf.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    smap = out / "special_tokens_map.json"
    if not smap.exists():
        smap.write_text(json.dumps({
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        }, indent=2) + "\n")
