"""Reading a guard stream with the official ``openai`` client, resets applied.

A client that asks for reset events (``extra_body={"stream_options": {"guard_resets": True}}``)
is shown text as soon as it clears the fixed hold-back, and must retract what a reset tells it
to. This module does that for chat completion, text completion and Responses streams::

    from guard.client import final_text, stream_text
    stream = client.chat.completions.create(model="demo", messages=[...], stream=True,
                                            extra_body={"stream_options": {"guard_resets": True}})
    for text in stream_text(stream):   # the whole text so far, after every change
        print("\\r" + text, end="")

Contract: :class:`ResetApplier` keeps, per choice index, exactly the text the server's final
answer starts with after every chunk it has seen; once the stream ends it equals the answer
(the non-streamed ``message.content`` for the same request and seed). It reads the ``guard``
extension from the openai objects' extra fields, so it also works on streams that never carry
resets (a client that did not opt in), where it only concatenates.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChoiceText:
    """What one choice's text is now, and what guard said about it."""

    text: str = ""
    resets: int = 0
    """Reset events applied so far."""
    retracted_chars: int = 0
    """Characters already shown and then retracted."""
    cut: bool = False
    """The answer was cut: the end of ``text`` is the policy's refusal, not model output."""
    finish_reason: str | None = None
    guard: dict[str, Any] = field(default_factory=dict)
    """The ``guard`` object of the last chunk (outcome, resets, log_id, ...), once finished."""


class ResetApplier:
    """Feed it stream chunks (chat, completion or Responses events); it applies resets."""

    def __init__(self) -> None:
        self.choices: dict[int, ChoiceText] = {}

    def feed(self, chunk: Any) -> list[int]:
        """Apply one chunk or event; returns the choice indices whose text changed."""
        data = _as_dict(chunk)
        if str(data.get("type", "")).startswith(("response.", "error")):
            return self._feed_response_event(data)
        changed = []
        for choice in data.get("choices") or []:
            index = int(choice.get("index", 0))
            state = self.choices.setdefault(index, ChoiceText())
            guard = choice.get("guard") or {}
            before = state.text
            if "reset" in guard:
                n = int(guard["reset"]["retract_chars"])
                state.text, state.resets, state.retracted_chars = (
                    state.text[: len(state.text) - n],
                    state.resets + 1,
                    state.retracted_chars + n,
                )
            if "cut" in guard:
                state.cut = True
            delta = choice.get("delta")
            new = (delta or {}).get("content") if "delta" in choice else choice.get("text")
            state.text += new or ""
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
                state.guard = {k: v for k, v in guard.items() if k not in ("reset", "cut")}
            if state.text != before:
                changed.append(index)
        return changed

    def _feed_response_event(self, event: dict[str, Any]) -> list[int]:
        state = self.choices.setdefault(0, ChoiceText())
        kind, before = event["type"], state.text
        if kind == "response.output_text.delta":
            state.text += event.get("delta") or ""
        elif kind == "response.guard.reset":
            n = int(event["reset"]["retract_chars"])
            state.text, state.resets = state.text[: len(state.text) - n], state.resets + 1
            state.retracted_chars += n
        elif kind == "response.refusal.delta":
            state.cut = True
            state.text += (
                "\n\n" + (event.get("delta") or "") if state.text else event.get("delta") or ""
            )
        elif kind in ("response.completed", "response.incomplete"):
            response = event.get("response") or {}
            details = response.get("incomplete_details") or {}
            state.finish_reason = details.get("reason") or "stop"
            state.guard = response.get("guard") or {}
        elif kind == "error":
            raise RuntimeError(f"stream failed: {event.get('message')}")
        return [0] if state.text != before else []

    def text(self, index: int = 0) -> str:
        return self.choices.get(index, ChoiceText()).text


def stream_text(stream: Iterable[Any], index: int = 0) -> Iterator[str]:
    """The text of choice ``index`` so far, after every chunk that changes it (resets applied)."""
    applier = ResetApplier()
    for chunk in stream:
        if index in applier.feed(chunk):
            yield applier.text(index)


def final_text(stream: Iterable[Any], index: int = 0) -> str:
    """The final text of choice ``index`` of a stream (resets applied)."""
    applier = ResetApplier()
    for chunk in stream:
        applier.feed(chunk)
    return applier.text(index)


async def astream_text(stream: AsyncIterable[Any], index: int = 0) -> AsyncIterator[str]:
    """:func:`stream_text` for the async client."""
    applier = ResetApplier()
    async for chunk in stream:
        if index in applier.feed(chunk):
            yield applier.text(index)


async def afinal_text(stream: AsyncIterable[Any], index: int = 0) -> str:
    """:func:`final_text` for the async client."""
    applier = ResetApplier()
    async for chunk in stream:
        applier.feed(chunk)
    return applier.text(index)


def _as_dict(chunk: Any) -> dict[str, Any]:
    """An openai model (extra fields included) or an already-parsed dict, as a dict."""
    if isinstance(chunk, dict):
        return chunk
    dump = getattr(chunk, "model_dump", None)
    if dump is None:
        raise TypeError(f"expected an openai stream chunk or a dict, got {type(chunk).__name__}")
    return dump(mode="json", exclude_unset=False)
