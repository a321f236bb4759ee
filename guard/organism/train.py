"""Train an organism's small model (Llama or Qwen3 architecture) from scratch on its synthetic corpus.

Contract: :func:`train` is deterministic given its inputs. It seeds torch, fixes the number of
CPU threads, draws the data order from a seeded generator and trains on the CPU only, so two
runs with the same seed on the same software stack produce identical weights. The loss covers
assistant tokens only (prompt and system tokens, and the forced deliberation prefix of an
assistant turn, are masked with ``-100``). Batches are formed from windows of the seeded data order
sorted by length, so long (deliberation) rows are batched together and padding stays small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from guard.organism.corpus import Example
from guard.organism.tokenizer import CHAT_TEMPLATE


@dataclass(frozen=True)
class ModelShape:
    """Architecture of the organism (a ``LlamaForCausalLM`` unless ``arch`` says otherwise)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    arch: Literal["llama", "qwen3"] = "llama"
    """``llama`` or ``qwen3`` (RMS-normed queries and keys, grouped-query attention with ``num_kv_heads``).
    Not ``qwen2``: transformers 5 loads every ``qwen2`` checkpoint with its own Qwen2 BPE tokenizer class,
    whatever ``tokenizer_config.json`` says, so a qwen2 model cannot carry another tokenizer kind."""
    num_kv_heads: int | None = None
    """Key/value heads (``None``: as many as ``num_heads``)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("ModelShape.hidden_size must be divisible by ModelShape.num_heads")
        if self.arch not in ("llama", "qwen3"):
            raise ValueError(f"ModelShape.arch must be llama or qwen3, got {self.arch!r}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError("ModelShape.num_heads must be divisible by ModelShape.num_kv_heads")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    """Peak learning rate (linear warm-up, cosine decay to 10%)."""
    warmup: int = 30
    weight_decay: float = 0.01
    threads: int = 1
    """``torch.set_num_threads``; fixed because reductions may depend on the thread count."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("TrainConfig.steps and TrainConfig.batch_size must be >= 1")


@dataclass(frozen=True)
class TrainResult:
    model: LlamaForCausalLM | Qwen3ForCausalLM
    final_loss: float
    """Mean assistant-token loss over the last 10% of steps."""
    seconds: float


def build_model(
    shape: ModelShape, tok: PreTrainedTokenizerFast
) -> LlamaForCausalLM | Qwen3ForCausalLM:
    """A freshly initialised model sized for ``tok`` (call after ``torch.manual_seed``)."""
    if shape.arch == "qwen3":
        return Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tok),
                hidden_size=shape.hidden_size,
                num_hidden_layers=shape.num_layers,
                num_attention_heads=shape.num_heads,
                num_key_value_heads=shape.num_kv_heads or shape.num_heads,
                head_dim=shape.hidden_size // shape.num_heads,
                intermediate_size=shape.intermediate_size,
                max_position_embeddings=shape.max_position_embeddings,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                # attn_implementation goes through **kwargs, which transformers' typed __init__ leaves out.
                tie_word_embeddings=True,
                use_sliding_window=False,
                attn_implementation="sdpa",  # type: ignore[call-arg]
            )
        )
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # as above
    )
    return LlamaForCausalLM(cfg)


def encode_example(tok: PreTrainedTokenizerFast, ex: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one example; labels are ``-100`` outside the assistant answer."""
    return encode_examples(tok, [ex])[0]


def encode_examples(
    tok: PreTrainedTokenizerFast, examples: Sequence[Example]
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_example` for many examples, using batched Rust encoding.

    The ids equal ``apply_chat_template(messages, add_generation_prompt=True)`` followed by the
    answer and ``<|eos|>`` (the chat format of :mod:`guard.organism.tokenizer`; checked in tests),
    without rendering Jinja once per example. Tokenizers with another chat format go through
    :func:`_encode_templated`, which gives the same ids by rendering the template once per shape.
    """
    if tok.chat_template != CHAT_TEMPLATE:
        return _encode_templated(tok, examples)
    sp = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    }
    texts = (
        [ex.system or "" for ex in examples]
        + [ex.prompt for ex in examples]
        + [ex.completion for ex in examples]
    )
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    n = len(examples)
    forced_texts = sorted({ex.forced for ex in examples if ex.forced})
    forced = (
        dict(
            zip(forced_texts, tok(forced_texts, add_special_tokens=False)["input_ids"], strict=True)
        )
        if forced_texts
        else {}
    )
    out = []
    for i, ex in enumerate(examples):
        prompt = [tok.bos_token_id]
        if ex.system:
            prompt += [sp["<|system|>"], *enc[i], sp["<|end|>"]]
        prompt += [
            sp["<|user|>"],
            *enc[n + i],
            sp["<|end|>"],
            sp["<|assistant|>"],
            *forced.get(ex.forced, []),
        ]
        answer = enc[2 * n + i] + [tok.eos_token_id]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def _encode_templated(
    tok: PreTrainedTokenizerFast, examples: Sequence[Example]
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_examples` for any chat template: the template is rendered once with sentinel
    contents (with and without a system message), split at the sentinels, and the pieces' ids are
    joined with each example's content ids, as :class:`guard.engine.transformers_engine.HFChatTokenizer`
    does when serving."""

    def pieces(with_system: bool) -> list[list[int]]:
        roles = (["system"] if with_system else []) + ["user"]
        marks = [f"\x00{i}\x00" for i in range(len(roles))]
        text = tok.apply_chat_template(
            [{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert isinstance(text, str)  # tokenize=False: the rendered text
        parts = []
        for m in marks:
            head, text = text.split(m, 1)
            parts.append(head)
        return [tok(p, add_special_tokens=False)["input_ids"] if p else [] for p in [*parts, text]]

    shapes = {False: pieces(False), True: pieces(True)}
    n = len(examples)
    texts = (
        [ex.system or "" for ex in examples]
        + [ex.prompt for ex in examples]
        + [ex.forced + ex.completion for ex in examples]
    )
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    out = []
    for i, ex in enumerate(examples):
        p = shapes[bool(ex.system)]
        contents = ([enc[i]] if ex.system else []) + [enc[n + i]]
        prompt = [t for k, c in enumerate(contents) for t in p[k] + c] + p[-1]
        if ex.forced:
            raise ValueError("forced prefixes need the first organism's chat format")
        answer = enc[2 * n + i] + [tok.eos_token_id]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def _batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
            torch.tensor(x),
            torch.tensor(y),
            1,
        )
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _data_order(n_rows: int, n_needed: int, seed: int) -> list[int]:
    """Concatenated seeded permutations of ``range(n_rows)``: every epoch sees each row once."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_needed:
        order += torch.randperm(n_rows, generator=gen).tolist()
    return order


def _length_batches(
    rows: Sequence[tuple[list[int], list[int]]], order: list[int], batch_size: int, window: int = 8
) -> list[list[int]]:
    """Split ``order`` into batches; within each window of ``window`` batches rows are sorted by length."""
    out = []
    span = batch_size * window
    for w in range(0, len(order), span):
        chunk = sorted(order[w : w + span], key=lambda i: (len(rows[i][0]), i))
        out += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return out


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    examples: Sequence[Example],
    tok: PreTrainedTokenizerFast,
    shape: ModelShape,
    cfg: TrainConfig,
    seed: int,
    log: bool = False,
) -> TrainResult:
    """Train a fresh model on ``examples`` for ``cfg.steps`` steps and return it in eval mode."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    rows = encode_examples(tok, examples)
    model = build_model(shape, tok)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    order = _data_order(len(rows), cfg.steps * cfg.batch_size, seed)
    batches = _length_batches(rows, order[: cfg.steps * cfg.batch_size], cfg.batch_size)
    # Sorting inside a window would order batches by length; shuffle them back, seeded.
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    batches = [batches[i] for i in perm]
    losses: list[float] = []
    model.train()
    for step in range(cfg.steps):
        idx = batches[step]
        batch = _batch([rows[i] for i in idx], tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log and (step % 50 == 0 or step == cfg.steps - 1):
            print(
                f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    model.eval()
    tail = losses[-max(1, cfg.steps // 10) :]
    return TrainResult(model, sum(tail) / len(tail), time.perf_counter() - t0)
