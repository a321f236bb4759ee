"""A streamed text chunk spliced into its serialised form (server.serving.TextEvent) is byte for byte
the chunk pydantic serialises, for every character a decode can produce."""

from __future__ import annotations

import functools

import pytest

from server.serving import ChatServing, CompletionServing, TextEvent, _sse

TEXTS = [
    "",
    "plain words",
    'quotes " and \\ backslashes \\" and /slashes/',
    "\n\r\t\b\f control \x00\x01\x1f\x7f",
    "naïve café 日本語 🙂👨‍👩‍👧 \u2028\u2029 \ufeff \ufffd",
    "".join(chr(c) for c in range(0xD800)),
    "".join(chr(c) for c in range(0xE000, 0x10000)),
    "".join(chr(c) for c in range(0x10000, 0x10FFFF, 97)),
]


@pytest.mark.parametrize("serving", [ChatServing, CompletionServing])
def test_text_event_equals_serialised_chunk(serving):
    obj = serving.__new__(serving)
    chunk = functools.partial(serving.chunk, obj, "chatcmpl-x", 'm"odel', 1700000000, 3)
    event = TextEvent(chunk)
    assert event.form is not None  # the fast form, not the fallback
    for text in TEXTS:
        assert event.render(text) == _sse(chunk(text=text))
