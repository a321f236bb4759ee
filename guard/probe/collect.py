"""Teacher-forced activation collection for probe and SAE training.

Each example runs through the model once (``engine.hidden_states``) with *all* requested layers
captured, so a layer sweep never re-runs the model. By default only completion tokens are kept:
the tokens of ``encode(completion)`` appended to ``encode_chat([user prompt])`` (the row's
``messages``, raw prompt and ``context`` when it has them: :mod:`guard.probe.data`), i.e. what a
monitor would see as output tokens at serving time. ``span="all"`` keeps the prompt tokens too
(SAE training); :attr:`Activations.completion` then marks which tokens are completion tokens.
``span="prompt"`` keeps only the prompt tokens, what a prompt-scope monitor reads at prefill (the
row's label then says whether the *request* should be flagged; the completion is not run).

With an :class:`~guard.probe.cache.ActivationCache`, a collection whose model, examples, layers
and span were seen before is read from disk instead of running the model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from guard.engine.base import Engine
from guard.probe.data import DataError, Example

Span = Literal["completion", "all", "prompt"]
Pooling = Literal["token", "mean", "last"]


@dataclass
class Activations:
    """Token activations of a list of examples, rows concatenated in order."""

    hidden: dict[int, torch.Tensor]
    """Layer -> ``[n_tokens, d_model]`` float32."""
    row: np.ndarray
    """``[n_tokens]`` index of each token's example (non-decreasing: rows are contiguous)."""
    labels: np.ndarray
    """``[n_rows]`` example labels (0/1)."""
    token_ids: np.ndarray | None = None
    """``[n_tokens]`` token id of each kept token (for showing examples), if known."""
    completion: np.ndarray | None = None
    """``[n_tokens]`` bool: the token belongs to the completion. ``None`` means all of them do."""

    @property
    def n_rows(self) -> int:
        return len(self.labels)

    @property
    def n_tokens(self) -> int:
        return len(self.row)

    def token_labels(self) -> np.ndarray:
        return self.labels[self.row]

    def select(self, rows: np.ndarray) -> Activations:
        """The activations of ``rows`` (example indices), renumbered ``0..len(rows)-1`` in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.searchsorted(self.row, rows, side="left")
        ends = np.searchsorted(self.row, rows, side="right")
        order = np.concatenate(
            [np.arange(a, b) for a, b in zip(starts, ends, strict=True)] + [np.zeros(0, np.int64)]
        )
        return self._take(
            order.astype(np.int64),
            np.repeat(np.arange(len(rows)), ends - starts),
            self.labels[rows],
        )

    def completion_only(self) -> Activations:
        """The same rows with only their completion tokens (a no-op for ``span="completion"``)."""
        if self.completion is None:
            return self
        keep = np.flatnonzero(self.completion)
        return self._take(keep, self.row[keep], self.labels)

    def _take(self, order: np.ndarray, new_row: np.ndarray, labels: np.ndarray) -> Activations:
        idx = torch.from_numpy(order)
        return Activations(
            {layer: h[idx] for layer, h in self.hidden.items()},
            new_row,
            labels,
            None if self.token_ids is None else self.token_ids[order],
            None if self.completion is None else self.completion[order],
        )

    def pooled(self, layer: int, pooling: Pooling) -> torch.Tensor:
        """``[n_rows, d]``: per row the mean (``mean``) or last (``last``) completion-token activation."""
        acts = self.completion_only()
        h = acts.hidden[layer]
        bounds = np.searchsorted(acts.row, np.arange(acts.n_rows + 1))
        if (np.diff(bounds) == 0).any():
            raise DataError("pooling needs at least one completion token per row")
        if pooling == "last":
            return h[torch.from_numpy(bounds[1:] - 1)]
        if pooling == "mean":
            sums = torch.zeros(acts.n_rows, h.shape[1], dtype=h.dtype).index_add_(
                0, torch.from_numpy(acts.row), h
            )
            return sums / torch.from_numpy(np.diff(bounds)).to(h.dtype)[:, None]
        raise ValueError(f"unknown pooling {pooling!r} (mean or last; token needs no pooling)")


def prompt_ids(engine: Engine, ex: Example) -> list[int]:
    """Token ids of ``ex``'s prompt as serving tokenizes it: the chat template over ``ex.chat()``,
    or the plain text of a ``raw_prompt`` row."""
    return (
        engine.tokenizer.encode(ex.prompt)
        if ex.raw_prompt
        else engine.tokenizer.encode_chat(ex.chat())
    )


def token_ids(engine: Engine, ex: Example) -> tuple[list[int], int]:
    """Token ids of ``ex`` and the number of tokens before the completion (prompt, then ``context``)."""
    prompt = prompt_ids(engine, ex) + (engine.tokenizer.encode(ex.context) if ex.context else [])
    completion = engine.tokenizer.encode(ex.completion)
    if not completion:
        raise DataError(f"{ex.source}: the completion encodes to no tokens")
    ids = prompt + completion
    if len(ids) > engine.info.context_length:
        raise DataError(
            f"{ex.source}: {len(ids)} tokens exceed the model's context of {engine.info.context_length}"
        )
    return ids, len(prompt)


class Cache(Protocol):
    """What :func:`collect` needs of a cache (:class:`guard.probe.cache.ActivationCache`)."""

    def key(self, examples: list[Example], layers: list[int], span: str) -> str: ...

    def path_of(self, key: str) -> Path: ...

    def get(self, key: str) -> Activations | None: ...

    def put(self, key: str, acts: Activations) -> Path: ...


def collect(
    engine: Engine,
    examples: list[Example],
    layers: Collection[int],
    *,
    desc: str = "activations",
    progress: bool = True,
    span: Span = "completion",
    cache: Cache | None = None,
) -> Activations:
    """Run every example once and keep the activations of its ``span`` tokens at ``layers``."""
    layers = sorted(set(layers))
    for layer in layers:
        if not 0 <= layer < engine.info.num_layers:
            raise ValueError(
                f"layer {layer} out of range (model has {engine.info.num_layers} layers)"
            )
    key = cache.key(examples, layers, span) if cache is not None else None
    if cache is not None and key is not None:
        hit = cache.get(key)
        if hit is not None:
            if progress:
                print(
                    f"{desc}: {len(examples)} rows from cache {cache.path_of(key)}", file=sys.stderr
                )
            return hit
    acts = _run(engine, examples, layers, desc=desc, progress=progress, span=span)
    if cache is not None and key is not None:
        cache.put(key, acts)
    return acts


def _run(
    engine: Engine,
    examples: list[Example],
    layers: list[int],
    *,
    desc: str,
    progress: bool,
    span: Span,
) -> Activations:
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    rows, ids_out, is_completion = [], [], []
    bar = Progress(desc, len(examples), enabled=progress)
    for i, ex in enumerate(examples):
        ids, n_prompt = token_ids(engine, ex)
        if span == "prompt":
            # causal: the prompt's activations depend neither on the context nor on the completion
            ids = prompt_ids(engine, ex)
            n_prompt = len(ids)
        hidden = engine.hidden_states(ids, layers)
        start = n_prompt if span == "completion" else 0
        for layer in layers:
            chunks[layer].append(hidden[layer][start:].float().cpu())
        rows.append(np.full(len(ids) - start, i))
        ids_out.append(np.asarray(ids[start:], dtype=np.int64))
        is_completion.append(np.arange(start, len(ids)) >= n_prompt)
        bar.update(i + 1)
    bar.close()
    d = engine.info.d_model

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return Activations(
        {layer: torch.cat(c) if c else torch.zeros(0, d) for layer, c in chunks.items()},
        cat(rows, np.int64),
        np.array([ex.label for ex in examples], dtype=np.int64),
        cat(ids_out, np.int64),
        None if span != "all" else cat(is_completion, bool),
    )


class Progress:
    """A one-line progress bar on stderr, redrawn at most once a second (and at the end)."""

    def __init__(self, desc: str, total: int, *, enabled: bool = True, width: int = 24) -> None:
        self.desc, self.total, self.enabled, self.width = desc, total, enabled, width
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 1.0 and done != self.total):
            return
        self.last = now
        frac = done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = now - self.start
        eta = f" eta {elapsed / frac - elapsed:.0f}s" if 0 < frac < 1 else ""
        print(
            f"\r{self.desc}: [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} rows "
            f"{elapsed:.0f}s{eta}",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)
