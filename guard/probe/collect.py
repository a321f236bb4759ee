"""Teacher-forced activation collection for probe training.

Each example runs through the model once (``engine.hidden_states``) with *all* requested layers
captured, so a layer sweep never re-runs the model. Only completion tokens are kept: the tokens of
``encode(completion)`` appended to ``encode_chat([user prompt])``, i.e. what a monitor would see as
output tokens at serving time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from guard.engine.base import Engine
from guard.probe.data import DataError, Example


@dataclass
class Activations:
    """Completion-token activations of a list of examples, rows concatenated in order."""

    hidden: dict[int, torch.Tensor]
    """Layer -> ``[n_tokens, d_model]`` float32."""
    row: np.ndarray
    """``[n_tokens]`` index of each token's example (non-decreasing: rows are contiguous)."""
    labels: np.ndarray
    """``[n_rows]`` example labels (0/1)."""

    @property
    def n_rows(self) -> int:
        return len(self.labels)

    def token_labels(self) -> np.ndarray:
        return self.labels[self.row]

    def select(self, rows: np.ndarray) -> "Activations":
        """The activations of ``rows`` (example indices), renumbered ``0..len(rows)-1`` in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.searchsorted(self.row, rows, side="left")
        ends = np.searchsorted(self.row, rows, side="right")
        order = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)] + [np.zeros(0, np.int64)])
        new_row = np.repeat(np.arange(len(rows)), ends - starts)
        idx = torch.from_numpy(order.astype(np.int64))
        return Activations({l: h[idx] for l, h in self.hidden.items()}, new_row, self.labels[rows])


def token_ids(engine: Engine, ex: Example) -> tuple[list[int], int]:
    """Token ids of ``ex`` and the number of prompt tokens before the completion."""
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": ex.prompt}])
    completion = engine.tokenizer.encode(ex.completion)
    if not completion:
        raise DataError(f"{ex.source}: the completion encodes to no tokens")
    ids = prompt + completion
    if len(ids) > engine.info.context_length:
        raise DataError(f"{ex.source}: {len(ids)} tokens exceed the model's context of {engine.info.context_length}")
    return ids, len(prompt)


def collect(engine: Engine, examples: list[Example], layers: Collection[int], *, desc: str = "activations",
            progress: bool = True) -> Activations:
    """Run every example once and keep the completion tokens' activations at ``layers``."""
    layers = sorted(set(layers))
    for layer in layers:
        if not 0 <= layer < engine.info.num_layers:
            raise ValueError(f"layer {layer} out of range (model has {engine.info.num_layers} layers)")
    chunks: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    rows: list[np.ndarray] = []
    start = last = time.monotonic()
    for i, ex in enumerate(examples):
        ids, n_prompt = token_ids(engine, ex)
        hidden = engine.hidden_states(ids, layers)
        for layer in layers:
            chunks[layer].append(hidden[layer][n_prompt:].float().cpu())
        rows.append(np.full(len(ids) - n_prompt, i))
        now = time.monotonic()
        if progress and (now - last > 1.0 or i + 1 == len(examples)):
            last = now
            print(f"\r{desc}: {i + 1}/{len(examples)} rows ({now - start:.0f}s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return Activations({l: torch.cat(c) for l, c in chunks.items()}, np.concatenate(rows),
                       np.array([ex.label for ex in examples], dtype=np.int64))
