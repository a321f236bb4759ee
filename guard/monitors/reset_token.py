"""Reset-token monitor: fires when the model itself emits its reset token.

A model trained to backtrack (Zhang et al. 2024, "Backtracking improves generation safety") emits a
special token such as ``<|reset|>`` right after it notices it has started an unsafe answer. The
monitor reads token ids only (``layer is None``): score 1.0 on the reset id, 0.0 elsewhere, no
aggregation, threshold 0.5, so it fires exactly at the reset token.
"""

from __future__ import annotations

import torch

from guard.errors import ModelLoadError
from guard.modelinfo import ChatTokenizer
from guard.monitors.base import AggregationSpec, Monitor

DEFAULT_RESET_TOKEN = "<|reset|>"


class ResetTokenMonitor(Monitor):
    """Scores 1.0 on ``token_id`` and 0.0 on every other token."""

    def __init__(self, name: str, token_id: int, token: str = DEFAULT_RESET_TOKEN) -> None:
        self.name = name
        self.token_id = int(token_id)
        self.token = token
        self.layer = None
        self.threshold = 0.5
        self.aggregation = AggregationSpec(kind="none")

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: ChatTokenizer,
        token: str = DEFAULT_RESET_TOKEN,
        *,
        name: str = "reset_token",
    ) -> ResetTokenMonitor:
        """Look ``token`` up in the model's vocabulary; :class:`ModelLoadError` if it is not one token."""
        tid = tokenizer.token_id(token)
        if tid is None:
            raise ModelLoadError(
                f"monitor '{name}': the model's vocabulary has no token {token!r}; a reset_token "
                f"monitor needs a model trained to emit it (or set `token:` in the policy)"
            )
        return cls(name, tid, token)

    def score(self, hidden: torch.Tensor | None, token_ids: list[int]) -> list[float]:
        return [1.0 if t == self.token_id else 0.0 for t in token_ids]
