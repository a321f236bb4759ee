"""What a monitor may know about the model it reads: its static facts and its tokenizer.

Below both the engines (which produce them) and the monitors (which check against them), so
neither package imports the other for these. :mod:`guard.engine.base` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["ChatTokenizer", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the served model."""

    name: str
    """Model id reported to clients (``/v1/models``)."""
    num_layers: int
    d_model: int
    vocab_size: int
    context_length: int
    eos_token_ids: frozenset[int]


class ChatTokenizer(Protocol):
    """What the controller and server need from the model's tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` under the model's chat template, ready for the assistant turn."""
        ...

    def token_id(self, token: str) -> int | None:
        """Id of a single (special) token, or ``None`` if the vocabulary has no such token."""
        ...
