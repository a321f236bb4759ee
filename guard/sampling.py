"""Sampling parameters and the sampler shared by engines that sample in Python.

Contract: :func:`sample` turns one row of next-token logits into one token id. The order of
operations is fixed and documented because it changes results, and it is vLLM's: logit bias,
allowed and banned tokens, repetition penalty (over the sequence so far: prompt and output),
temperature (0 means greedy), min-p, top-k, top-p, then a draw from a seeded ``torch.Generator``.
The same logits, parameters, history and generator state always give the same token.

``ignore_eos`` and ``min_tokens`` concern when a sequence may end, not a single draw: the
controller does not stop on end-of-sequence under ``ignore_eos`` (:meth:`SamplingParams.ends`),
and engines ban the end tokens while fewer than ``min_tokens`` answer tokens exist
(:meth:`SamplingParams.end_ids_banned`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import torch

from guard.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence samples. Validated on construction; errors name the parameter."""

    temperature: float = 1.0
    """Softmax temperature; 0 selects the arg-max token (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to ``top_p``."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens; 0 disables."""
    seed: int | None = None
    """Seed of the sequence's generator; ``None`` draws a random seed."""
    max_tokens: int = 256
    """Most output tokens to generate, discarded and resampled tokens not counted."""
    stop: tuple[str, ...] = ()
    """Stop strings; the output ends before the first occurrence, which is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the sequence (in addition to the model's end-of-sequence ids)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of the given token ids before anything else."""
    banned_token_ids: frozenset[int] = frozenset()
    """Token ids that are never sampled."""
    allowed_token_ids: frozenset[int] | None = None
    """Only these token ids may be sampled (``None``: every token); bans still apply."""
    ignore_eos: bool = False
    """Keep generating after the model's end-of-sequence tokens (``stop_token_ids`` still end it)."""
    min_tokens: int = 0
    """End-of-sequence and ``stop_token_ids`` are never sampled before this many answer tokens."""
    repetition_penalty: float = 1.0
    """vLLM's (and CTRL's) repetition penalty over every token of the sequence so far, prompt
    included: a positive logit of such a token is divided by it, a negative one multiplied; 1 disables."""
    min_p: float = 0.0
    """After temperature, drop tokens less likely than ``min_p`` times the most likely one; 0 disables."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature must be between 0 and 2", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be >= 0", param="top_k")
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be >= 1", param="max_tokens")
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            raise InvalidRequestError(
                "repetition_penalty must be a finite number > 0", param="repetition_penalty"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p must be in [0, 1]", param="min_p")
        if self.min_tokens < 0:
            raise InvalidRequestError("min_tokens must be >= 0", param="min_tokens")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                param="min_tokens",
            )
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequestError(
                "allowed_token_ids must not be empty", param="allowed_token_ids"
            )
        if len(self.stop) > 4:
            raise InvalidRequestError("at most 4 stop sequences are allowed", param="stop")
        for tid, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequestError(
                    f"logit_bias for token {tid} must be in [-100, 100]", param="logit_bias"
                )

    def with_changes(self, **changes) -> SamplingParams:
        """A copy with ``changes`` applied (and validated again)."""
        return replace(self, **changes)

    def ends(self, token: int, eos_token_ids: Collection[int]) -> bool:
        """Whether ``token`` ends the sequence: a stop token id, or end-of-sequence unless ``ignore_eos``."""
        return token in self.stop_token_ids or (not self.ignore_eos and token in eos_token_ids)

    def end_ids_banned(self, answer_tokens: int, eos_token_ids: Collection[int]) -> frozenset[int]:
        """The end tokens that may not be sampled as answer token number ``answer_tokens + 1``
        (``min_tokens``): every end-of-sequence and stop token id until ``min_tokens`` exist."""
        if answer_tokens >= self.min_tokens:
            return frozenset()
        return frozenset(eos_token_ids) | frozenset(self.stop_token_ids)


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Raise :class:`InvalidRequestError` if a token id in ``params`` is outside the vocabulary."""
    for name, ids in (
        ("logit_bias", params.logit_bias.keys()),
        ("stop_token_ids", params.stop_token_ids),
        ("banned_token_ids", params.banned_token_ids),
        ("allowed_token_ids", params.allowed_token_ids or ()),
    ):
        for tid in ids:
            if not 0 <= int(tid) < vocab_size:
                raise InvalidRequestError(
                    f"token id {tid} is outside the vocabulary (size {vocab_size})", param=name
                )


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded with ``seed`` (a random seed when ``None``)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    extra_banned: frozenset[int] = frozenset(),
    history: Sequence[int] = (),
) -> torch.Tensor:
    """Apply bias, allowed and banned tokens and the repetition penalty (over ``history``, the
    sequence's token ids so far) to a 1-D logits row (float32 copy); temperature is applied by
    :func:`sample`."""
    out = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long, device=out.device)
        vals = torch.tensor(list(params.logit_bias.values()), dtype=out.dtype, device=out.device)
        out.index_add_(0, ids, vals)
    if params.allowed_token_ids is not None:
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep[
            torch.tensor(sorted(params.allowed_token_ids), dtype=torch.long, device=out.device)
        ] = True
        out = out.masked_fill(~keep, float("-inf"))
    banned = params.banned_token_ids | extra_banned
    if banned:
        out[torch.tensor(sorted(banned), dtype=torch.long, device=out.device)] = float("-inf")
    if params.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=out.device)
        vals = out[seen]
        out[seen] = torch.where(
            vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty
        )
    return out


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    extra_banned: frozenset[int] = frozenset(),
    history: Sequence[int] = (),
) -> int:
    """Sample one token id from a 1-D logits row. ``extra_banned`` applies to this draw only;
    ``history`` (prompt and output token ids so far) is what the repetition penalty reads."""
    scores = process_logits(logits, params, extra_banned, history)
    if not torch.isfinite(scores).any():
        raise InvalidRequestError(
            "every token is banned; nothing can be sampled", param="logit_bias"
        )
    if params.temperature == 0.0:
        return int(torch.argmax(scores))
    scores = scores / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop[0] = False
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
