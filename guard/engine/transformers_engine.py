"""The embedded engine: any local HuggingFace causal LM, CPU or GPU, through ``transformers``.

Decoding is incremental with a ``DynamicCache`` per sequence. A rollback crops that cache; the
prompt is never run twice. To resume sampling right after a rollback the engine needs the
logits at the new last position, so:

- a rollback to the start of the response reuses the logits kept from prefill (0 tokens re-run);
- a rollback to length ``L > prompt_len`` crops the cache to ``L - 1`` and re-feeds output token
  ``L - 1`` (one output token recomputed, counted in ``stats.refed_tokens``).

Residual-stream activations are captured with forward hooks on the decoder blocks that exist
only for the duration of one forward call (:mod:`guard.engine.hooks`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from guard import sampling
from guard.engine.base import Engine, EngineStats, ModelInfo, MonitorRun, Sequence, StepOutput
from guard.engine.hooks import capture_layers, decoder_layers
from guard.errors import ModelLoadError
from guard.neutralise import neutralise_text
from guard.sampling import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HFChatTokenizer:
    """Adapter from a ``transformers`` tokenizer to :class:`guard.engine.base.ChatTokenizer`."""

    def __init__(self, tok) -> None:
        self.tok = tok
        if getattr(tok, "chat_template", None) is None:
            raise ModelLoadError(
                "the tokenizer has no chat template; add `chat_template` to tokenizer_config.json"
            )

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token can stand for: the longest vocabulary
        entry's UTF-8 length (byte-level BPE spells each byte as one 1-2 byte character, SentencePiece
        spells a space as 3 bytes and a byte as ``<0xNN>``, so entries are never shorter than their text)."""
        return (
            max((len(t.encode("utf-8", "surrogatepass")) for t in self.tok.get_vocab()), default=1)
            or 1
        )

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat ids in which message content is always plain text.

        Neutralisation rule: special-token text inside any message's content (``<|end|>``,
        ``<|assistant|>``, ``<|/think|>``...) is tokenized as ordinary text, never as the special
        token, so a message can neither end its turn nor open or close a reasoning section. The
        template is rendered with a sentinel in place of each content; the template's own text is
        tokenized normally and each content with special tokens split. A template that alters
        the sentinels (rare) falls back to breaking special-token text in the content with a
        zero-width joiner.
        """
        sentinels = [f"\x00guard-content-{i}\x00" for i in range(len(messages))]
        placeheld = [
            {**m, "content": s} if isinstance(m.get("content"), str) else m
            for m, s in zip(messages, sentinels, strict=True)
        ]
        text = self.tok.apply_chat_template(placeheld, add_generation_prompt=True, tokenize=False)
        used = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str)]
        if any(text.count(sentinels[i]) != 1 for i in used):
            return self._encode_chat_escaped(messages)
        ids: list[int] = []
        for i in used:
            head, text = text.split(sentinels[i], 1)
            ids += self.encode(head) + self.encode_plain(messages[i]["content"])
        return ids + self.encode(text)

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` with any special-token text tokenized as ordinary characters."""
        return list(
            self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )

    def _encode_chat_escaped(self, messages: list[dict[str, str]]) -> list[int]:
        specials = tuple(self.tok.all_special_tokens)
        safe = [
            {**m, "content": neutralise_text(m["content"], specials)}
            if isinstance(m.get("content"), str)
            else m
            for m in messages
        ]
        return self.encode(
            self.tok.apply_chat_template(safe, add_generation_prompt=True, tokenize=False)
        )

    def token_id(self, token: str) -> int | None:
        tid = self.tok.convert_tokens_to_ids(token)
        if (
            tid is None
            or tid == self.tok.unk_token_id
            or self.tok.convert_ids_to_tokens(tid) != token
        ):
            return None
        return int(tid)

    def token_text(self, tid: int) -> str:
        """Text of one token on its own (special tokens shown as themselves)."""
        return self.tok.decode([tid], skip_special_tokens=False)


@dataclass
class _SeqState:
    cache: object | None = None
    fed: int = 0
    """Tokens whose keys/values are in the cache."""
    pending_logits: torch.Tensor | None = None
    """Next-token logits after the last fed token, if not yet sampled from."""
    prefill_logits: torch.Tensor | None = None


class TransformersEngine(Engine):
    """Engine over a HF ``PreTrainedModel``. Call from one thread at a time (the engine worker)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer, *, name: str, max_context: int | None = None
    ) -> None:
        self.model = model.eval()
        self.tokenizer = HFChatTokenizer(tokenizer)
        self.layers = decoder_layers(model)
        cfg = model.config
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = (
            frozenset(eos if isinstance(eos, list) else [eos]) if eos is not None else frozenset()
        )
        ctx = int(getattr(cfg, "max_position_embeddings", 2048))
        self.info = ModelInfo(
            name=name,
            num_layers=len(self.layers),
            d_model=int(cfg.hidden_size),
            vocab_size=int(cfg.vocab_size),
            context_length=min(ctx, max_context or ctx),
            eos_token_ids=eos_ids,
        )
        self.device = next(model.parameters()).device
        self.stats = EngineStats()

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        name: str | None = None,
        max_context: int | None = None,
    ) -> TransformersEngine:
        """Load a local HF model directory (no hub access). Errors are :class:`ModelLoadError`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a HF model directory (no config.json)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            torch_dtype = torch.float32 if device == "cpu" else "auto"
        else:
            torch_dtype = _DTYPES[dtype]
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
        # transformers types PreTrainedModel.to through a decorator that loses its signature.
        model = model.to(device)  # type: ignore[arg-type]
        return cls(model, tok, name=name or path.name, max_context=max_context)

    # -- the Engine interface -------------------------------------------------------------

    def new_sequence(
        self,
        prompt_ids: list[int],
        layers: Collection[int] = (),
        monitors: Collection[MonitorRun] = (),
    ) -> Sequence:
        self.check_new_sequence(prompt_ids, layers)
        return Sequence(
            prompt_ids=list(prompt_ids), layers=tuple(sorted(set(layers))), payload=_SeqState()
        )

    def prefill(self, seq: Sequence, return_hidden: bool = False) -> StepOutput:
        from transformers import DynamicCache

        state: _SeqState = seq.payload
        state.cache = DynamicCache(config=self.model.config)
        hidden, logits = self._forward(
            seq, seq.prompt_ids, capture=seq.layers if return_hidden else ()
        )
        state.fed = seq.prompt_len
        state.prefill_logits = state.pending_logits = logits
        self.stats.prompt_tokens += seq.prompt_len
        return StepOutput(token_id=None, fed_start=0, hidden=hidden if return_hidden else {})

    def step(
        self,
        seq: Sequence,
        params: SamplingParams,
        generator: torch.Generator,
        *,
        extra_banned: frozenset[int] = frozenset(),
        steer: Mapping[int, torch.Tensor] | None = None,
        sample: bool = True,
    ) -> StepOutput:
        state: _SeqState = seq.payload
        if state.cache is None:
            raise RuntimeError("step() before prefill()")
        fed_start = state.fed
        hidden: dict[int, torch.Tensor] = {}
        if state.fed < len(seq.tokens):
            new = seq.tokens[state.fed :]
            hidden, state.pending_logits = self._forward(seq, new, capture=seq.layers, steer=steer)
            state.fed = len(seq.tokens)
            self.stats.output_tokens += len(new)
        token = surprisal = None
        if sample:
            logits = state.pending_logits
            if logits is None:  # every path that feeds tokens leaves their logits here
                raise RuntimeError("step(sample=True) with no logits to sample from")
            a = seq.answer_start
            if params.min_tokens and a is not None:
                extra_banned = extra_banned | params.end_ids_banned(
                    len(seq.tokens) - a, self.info.eos_token_ids
                )
            token = sampling.sample(logits, params, generator, extra_banned, history=seq.tokens)
            surprisal = float(-torch.log_softmax(logits.float(), dim=-1)[token])
            seq.tokens.append(token)
            state.pending_logits = None
        return StepOutput(token_id=token, fed_start=fed_start, hidden=hidden, surprisal=surprisal)

    def rollback(self, seq: Sequence, length: int) -> None:
        state: _SeqState = seq.payload
        if length < seq.prompt_len:
            raise ValueError(
                f"cannot roll back into the prompt (length {length} < {seq.prompt_len})"
            )
        if length >= len(seq.tokens):
            return
        self.stats.rollbacks += 1
        del seq.tokens[length:]
        if length == seq.prompt_len:
            keep, state.pending_logits = seq.prompt_len, state.prefill_logits
        else:
            keep, state.pending_logits = min(state.fed, length - 1), None
            self.stats.refed_tokens += length - keep
        _crop(state.cache, state.fed - keep)
        state.fed = keep

    def release(self, seq: Sequence) -> None:
        state: _SeqState | None = seq.payload
        if state is not None:
            state.cache = state.pending_logits = state.prefill_logits = None

    @torch.inference_mode()
    def hidden_states(
        self, token_ids: list[int], layers: Collection[int]
    ) -> dict[int, torch.Tensor]:
        ids = torch.tensor([token_ids], device=self.device)
        with capture_layers(self.layers, capture=set(layers)) as captured:
            self.model(input_ids=ids, use_cache=False)
        return {layer: t[0] for layer, t in captured.items()}

    # -- internals --------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(
        self,
        seq: Sequence,
        new_ids: list[int],
        capture: Collection[int],
        steer: Mapping[int, torch.Tensor] | None = None,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        state: _SeqState = seq.payload
        ids = torch.tensor([new_ids], device=self.device)
        with capture_layers(self.layers, capture=capture, steer=steer) as captured:
            out = self.model(input_ids=ids, past_key_values=state.cache, use_cache=True)
        return {layer: t[0] for layer, t in captured.items()}, out.logits[0, -1].float()


def _crop(cache, n_remove: int) -> None:
    """Drop the last ``n_remove`` positions of a DynamicCache (negative ``crop`` works on all 4.x/5.x)."""
    if n_remove > 0:
        cache.crop(-n_remove)
