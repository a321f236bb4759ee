"""The engine seam: the smallest interface the controller needs from a model runtime.

An engine knows token ids, not text policy: it prefills a prompt, steps one token at a time,
rolls a sequence back to an earlier length, and reports the residual stream at requested layers.
Tokenisation and the chat template live in the engine's :attr:`Engine.tokenizer` because they
belong to the model, but stop strings, monitors and streaming are the controller's business.

Layer numbering: layer ``L`` is the *output* of decoder block ``L`` (``blocks.L.hook_resid_post``
in TransformerLens terms, ``hidden_states[L + 1]`` in HF terms), 0-based.

The one-step lag: the activation of a token exists only once the token has been fed back through
the model, which happens in the step that samples the *next* token. :meth:`Engine.step` therefore
returns the newly sampled token together with the activations of the tokens it fed, which are
the tokens sampled before it. ``step(..., sample=False)`` feeds pending tokens without sampling,
so the last token of a finished sequence can be scored.

Positions are absolute (prompt tokens included); ``Sequence.prompt_len`` separates the two.

Engines that run monitors themselves (``Engine.runs_monitors``, e.g. vLLM, where activations stay
in the worker process) get the monitors with :meth:`Engine.new_sequence` and report raw scores in
``StepOutput.scores`` instead of activations in ``StepOutput.hidden``; such an engine may also end
a step without sampling (``token_id is None`` on a sampling step) when an acting monitor fired on
the fed tokens, and the caller then acts on the scores before stepping again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from guard import positions
from guard.errors import ContextLengthError
from guard.modelinfo import ChatTokenizer, ModelInfo
from guard.sampling import SamplingParams

if TYPE_CHECKING:
    from guard.monitors.base import Monitor


@dataclass(frozen=True)
class MonitorRun:
    """A monitor a sequence wants scored, for engines that run monitors themselves."""

    monitor: Monitor
    acts: bool
    """Its firing changes the answer (backtrack or refuse): the engine may stop generating at once."""
    prompt: bool
    """Score the prompt tokens at prefill."""
    output: bool
    """Score answer tokens."""


@dataclass
class Sequence:
    """One generation's token state inside an engine. Engines keep their own data in ``payload``."""

    prompt_ids: list[int]
    layers: tuple[int, ...]
    """Layers whose activations each step reports."""
    tokens: list[int] = field(default_factory=list)
    """All tokens, prompt first; the output is ``tokens[prompt_len:]``."""
    payload: Any = None
    answer_start: int | None = None
    """Absolute position of the answer's first token (past a reasoning section); ``None`` while a
    reasoning section is open (nothing sampled is answer yet). Set by the controller; engines that
    run monitors score and act on answer positions only. Defaults to ``prompt_len``."""
    threshold_scale: dict[str, float] = field(default_factory=dict)
    """Monitor name -> multiplier of its threshold the controller applies (stricter after it fired);
    engines that run monitors act at the same thresholds. Set by the controller."""
    surprisal: bool = True
    """Whether steps must report the sampled token's surprisal (:attr:`StepOutput.surprisal`, read
    by the controller's garble check). ``False`` lets an engine skip computing it (vLLM then asks
    for no logprobs); steps may then report ``None``. Set by the controller."""

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)
        if self.answer_start is None:
            self.answer_start = len(self.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]


@dataclass
class StepOutput:
    """What one :meth:`Engine.step` produced."""

    token_id: int | None
    """The newly sampled token (already appended to ``Sequence.tokens``), or ``None`` if not sampling."""
    fed_start: int
    """Absolute position of the first token fed in this step."""
    hidden: dict[int, torch.Tensor]
    """Layer -> ``[n_fed, d_model]`` activations of the fed tokens (float32, detached, cloned)."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    """Monitor name -> raw scores of the fed tokens from ``fed_start`` on, for engines that run
    monitors themselves (a list may be shorter than the fed tokens: positions before the answer or
    already reported are left out at its start)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Monitor name -> why it failed, for engines that run monitors themselves (the monitor raised
    or returned a non-finite score inside the engine); the controller applies ``on_monitor_error``."""

    surprisal: float | None = None
    """``-log p`` (nats) of the sampled token under the model's plain next-token distribution
    (temperature 1, nothing banned, biased or truncated); ``None`` if the engine does not report it."""

    @property
    def n_fed(self) -> int:
        if self.hidden:
            return next(iter(self.hidden.values())).shape[0]
        return max((len(v) for v in self.scores.values()), default=0)


@dataclass
class EngineStats:
    """Forward-pass token counters, for proving that rollbacks never re-run the prompt."""

    prompt_tokens: int = 0
    """Prompt tokens fed through the model (each prompt once, at prefill)."""
    output_tokens: int = 0
    """Output tokens fed through the model, including re-fed ones."""
    refed_tokens: int = 0
    """Tokens computed a second time because of a rollback or a new request (transformers: the
    output token just behind a mid-answer cut; vLLM: every token of a resubmitted prefix that its
    prefix cache did not serve)."""
    rollbacks: int = 0
    cached_tokens: int = 0
    """Tokens served from a prefix cache instead of being computed (vLLM)."""
    forced_resets: int = 0
    """Requests the engine's own monitors stopped (vLLM: the worker forced the reset token)."""
    reset_stop_mismatches: int = 0
    """Forced resets whose request vLLM reported stopped by something other than the reset id
    (vLLM's ``stop_reason``): 0 unless the worker and vLLM disagree."""
    resubmissions: int = 0
    """Requests after a sequence's first (resamples, continuations, scoring requests; vLLM)."""
    resubmitted_cached_tokens: int = 0
    """Prompt tokens of those requests served by vLLM's prefix cache (the rest are in
    ``refed_tokens``)."""


class Engine(ABC):
    """A model runtime the controller can drive. Implementations must be safe to call from one
    worker thread; concurrency comes from interleaving sequences (see :mod:`guard.engine.worker`)."""

    info: ModelInfo
    tokenizer: ChatTokenizer
    stats: EngineStats
    runs_monitors: bool = False
    """True if the engine scores activation monitors itself (``StepOutput.scores``)."""

    @abstractmethod
    def new_sequence(
        self,
        prompt_ids: list[int],
        layers: Collection[int] = (),
        monitors: Collection[MonitorRun] = (),
    ) -> Sequence:
        """Allocate a sequence for ``prompt_ids``; nothing runs until :meth:`prefill`.
        ``monitors`` matter only to engines that run monitors themselves."""

    @abstractmethod
    def prefill(self, seq: Sequence, return_hidden: bool = False) -> StepOutput:
        """Run the prompt once and keep its KV. The output has ``token_id=None``, ``fed_start=0`` and
        the prompt activations in ``hidden`` if ``return_hidden`` (or, for engines that run
        monitors, the prompt scores of prompt-scope monitors in ``scores``)."""

    @abstractmethod
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
        """Feed pending tokens and (if ``sample``) sample and append one token.

        ``extra_banned`` applies to this draw only. ``steer`` maps layer -> vector added to that
        layer's output for the tokens fed in this step.
        """

    @abstractmethod
    def rollback(self, seq: Sequence, length: int) -> None:
        """Keep the first ``length`` tokens (``length >= prompt_len``), reusing the KV cache."""

    def disable_monitor(self, seq: Sequence, name: str) -> None:  # noqa: B027 - optional hook
        """The controller stopped enforcing monitor ``name`` for ``seq`` (``fail_open``). Engines that
        run monitors themselves must stop acting on it for that sequence; the default does nothing."""

    @abstractmethod
    def release(self, seq: Sequence) -> None:
        """Free the sequence's cache. Idempotent."""

    @abstractmethod
    def hidden_states(
        self, token_ids: list[int], layers: Collection[int]
    ) -> dict[int, torch.Tensor]:
        """Teacher-forced activations ``[len(token_ids), d_model]`` per layer (for probe training)."""

    def rescore(self, seq: Sequence, monitors: Collection[Monitor]) -> dict[str, list[float]]:
        """Raw scores of every answer token (``seq.tokens[seq.answer_start:]``) per monitor, from one
        fresh forward pass over the whole sequence: no KV cache, no steering. A monitor's exception
        propagates. The default runs :meth:`hidden_states`; engines that keep activations to
        themselves override it."""
        a = positions.scoring_start(seq.answer_start, seq.prompt_len)
        hidden = self.hidden_states(seq.tokens, {m.layer for m in monitors if m.layer is not None})
        return {
            m.name: m.score(None if m.layer is None else hidden[m.layer][a:], seq.tokens[a:])
            for m in monitors
        }

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's resources (processes, caches). Idempotent; the default does nothing."""

    def check_new_sequence(self, prompt_ids: list[int], layers: Collection[int]) -> None:
        """What every :meth:`new_sequence` checks first: :class:`ContextLengthError` for an empty
        prompt or one that fills the context, ValueError for a layer the model does not have.

        An invariant, not request validation: a server request was checked already, naming the
        field at fault (:mod:`guard.service.prepare`); the engine knows token ids, not fields."""
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty")
        if len(prompt_ids) >= self.info.context_length:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.info.context_length}"
            )
        for layer in layers:
            if not 0 <= layer < self.info.num_layers:
                raise ValueError(
                    f"layer {layer} out of range (model has {self.info.num_layers} layers)"
                )
