"""Which token id the vLLM engine forces when a monitor fires, chosen without loading weights.

vLLM can only stop a request from inside its worker by making the sampler pick one token: the
guard's logits processor sets every other logit to ``-inf`` (:mod:`guard.engine.vllm_logits`).
Any id below the model's ``config.vocab_size`` (the rows of the logits vLLM samples from) can be
forced. The id must never be one the model produces in an answer, or a real token would read as
a firing. In order of preference:

1. ``policy``: ``model.vllm.reset_token_id`` as given;
2. ``reset token``: the vocabulary's ``reset_token`` (e.g. ``<|reset|>`` of a model trained to
   backtrack; the model may emit it itself, and that is honoured as its own reset);
3. ``spare embedding row``: the first row past the tokenizer's vocabulary when ``config.vocab_size``
   is larger (padded embeddings): no text ever tokenizes to it;
4. ``reserved special token``: an added special token named reserved/unused (Llama 3's
   ``<|reserved_special_token_N|>``, Gemma's ``<unusedN>``), never in training text;
5. ``padding id``: the tokenizer's pad token when it is no end-of-sequence, bos or unk token.

For choices 3-5 the engine also bans the id from every guarded draw, so the model can never sample
it and the id only ever appears forced. :func:`choose_reset_id` reads only ``config.json`` and the
tokenizer files, so ``guard policy check`` reports the choice without loading the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from guard.errors import ModelLoadError

_RESERVED = re.compile(r"reserved|unused", re.IGNORECASE)


class ResetChoice(NamedTuple):
    """The id to force and why it is safe."""

    token_id: int
    kind: str
    """``policy``, ``reset token``, ``spare embedding row``, ``reserved special token`` or ``padding id``."""
    detail: str
    """Human-readable: the token's text, or the vocabulary sizes."""

    @property
    def banned(self) -> bool:
        """Whether the engine bans the id from ordinary sampling (any choice but the model's own reset token)."""
        return self.kind not in ("reset token",)

    def describe(self) -> str:
        return f"id {self.token_id} ({self.kind}: {self.detail})"


def choose_reset_id(
    model_dir: str | Path,
    reset_token: str = "<|reset|>",
    reset_token_id: int | None = None,
    tokenizer=None,
) -> ResetChoice:
    """The reset id for the model in ``model_dir`` (see the module docstring for the order).

    ``tokenizer`` (a HF tokenizer) is loaded from ``model_dir`` when not given. Raises
    :class:`ModelLoadError` when no safe id exists or ``reset_token_id`` is out of range.
    """
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg
    rows = int(cfg["vocab_size"])
    if reset_token_id is not None:
        if not 0 <= reset_token_id < rows:
            raise ModelLoadError(
                f"model.vllm.reset_token_id {reset_token_id} is outside the model's vocabulary "
                f"(0..{rows - 1})"
            )
        return ResetChoice(reset_token_id, "policy", "model.vllm.reset_token_id")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    vocab = tokenizer.get_vocab()
    if reset_token in vocab and vocab[reset_token] < rows:
        return ResetChoice(vocab[reset_token], "reset token", reset_token)
    size = len(tokenizer)
    if rows > size:
        return ResetChoice(
            size, "spare embedding row", f"config.vocab_size {rows} > tokenizer's {size} tokens"
        )
    eos = cfg.get("eos_token_id")
    taken = {
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
        tokenizer.unk_token_id,
        *(eos if isinstance(eos, list) else [eos]),
    }
    specials = sorted(
        (tid, tok)
        for tok, tid in vocab.items()
        if tok in set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    )
    for tid, tok in specials:
        if _RESERVED.search(tok) and tid not in taken and tid < rows:
            return ResetChoice(tid, "reserved special token", tok)
    pad = tokenizer.pad_token_id
    if pad is not None and pad not in taken and pad < rows:
        return ResetChoice(pad, "padding id", tokenizer.pad_token)
    raise ModelLoadError(
        f"the model has no reset token {reset_token!r}, no spare embedding row (config.vocab_size "
        f"{rows} = the tokenizer's {size}), no reserved special token and no padding id distinct "
        "from end-of-sequence; give model.vllm.reset_token_id (an id the model never samples)"
    )


def policy_reset_line(policy) -> tuple[str, bool]:
    """One line for ``guard policy check`` about the reset id a vLLM policy will force, and whether
    it is an error (the server would refuse to start). Reads config and tokenizer, never weights."""
    spec = policy.model
    opts = spec.vllm
    token = opts.reset_token if opts is not None else "<|reset|>"
    tid = opts.reset_token_id if opts is not None else None
    if not (Path(spec.path) / "config.json").is_file():
        return f"vllm reset: not checked ({spec.path} is not a local model directory)", False
    try:
        return f"vllm reset: {choose_reset_id(spec.path, token, tid).describe()}", False
    except ModelLoadError as exc:
        return f"vllm reset: {exc}", True
