"""Token ids -> answer text, for the controller: release, stop strings, sentence starts.

Invariant: ``sent_text`` (what the client holds) is always a prefix of the text of the current
output, never ends inside a multi-byte character, and never includes the start of a stop string.

Releasing decodes incrementally (:class:`IncrementalText`, vLLM's incremental-detokenizer idea):
the text of ``output[:n]`` is the text of an *anchor* prefix (decoded once) plus what a short
window of tokens before the anchor decodes to with and without the new tokens, so a step costs a
decode of a few tokens, not of the whole answer; where the window's old text is not a prefix of its
new text, it decodes in full.
"""

from __future__ import annotations

from collections.abc import Callable

from guard.controller.events import TextDelta
from guard.engine.base import ChatTokenizer

SENTENCE_END = (".", "!", "?", "\n", "。", "！", "？")


class IncrementalText:
    """``decode(ids[:n])`` for a growing (sometimes cut back) token list, decoding a few tokens a call.

    Contract: :meth:`text` returns exactly ``decode(ids[:n])`` for a tokenizer whose decode is local
    (a token's text depends on at most :data:`MIN_CONTEXT_CHARS` characters before it: byte-level
    BPE, SentencePiece/Metaspace with byte fallback, WordLevel, and the clean-up of spaces before
    punctuation and contractions), and decodes in full where the context's text is not a prefix of
    the longer decode. The context is counted in characters, not tokens: tokens that decode to
    nothing (skipped special tokens) do not shorten it. State: the *anchor* ``ids[:a]`` with its text, never
    ending inside a character, and the text of the context window ``ids[start:a]``; a list that no
    longer starts with the anchor (a rollback) starts over from nothing.
    """

    window = 6
    """Tokens of context before the anchor (a character spans at most 4 byte tokens), more where
    they show fewer than :data:`MIN_CONTEXT_CHARS` characters."""
    lookback = 32
    """At most this many tokens more are taken into the context to reach whole characters and
    :data:`MIN_CONTEXT_CHARS`; short of that the next call decodes in full."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._text = ""
        """``decode(self._ids)``."""
        self._start = 0
        self._context = ""
        """``decode(self._ids[self._start:])``."""

    def text(self, ids: list[int], n: int) -> str:
        """``decode(ids[:n])``."""
        a = len(self._ids)
        if n < a or ids[:a] != self._ids:
            self._ids, self._text, self._start, self._context = [], "", 0, ""
        elif n == a:
            return self._text
        window = self._decode(ids[self._start : n])
        exact = window.startswith(self._context) and self._context_sound()
        text = self._text + window[len(self._context) :] if exact else self._decode(ids[:n])
        if not text.endswith("\ufffd"):  # the anchor never splits a character
            self._ids, self._text = ids[:n], text
            if exact and n - self._start <= 2 * self.window:
                self._context = window
            else:
                self._recontext(ids, n)
        return text

    def _context_sound(self) -> bool:
        """Whether the context's text shows how the tokens after it decode: it starts the list, or it
        starts with a whole character (not in the middle of one, whose bytes a byte-fallback decoder
        would spell as replacement characters together with the rest of their run) and is not
        too short (a decoder that strips the text's leading space would strip the next token's; a
        clean-up rule reads the characters before a token)."""
        return self._start == 0 or _sound(self._context)

    def _recontext(self, ids: list[int], n: int) -> None:
        """Context: the last :attr:`window` tokens of the anchor, or up to :attr:`lookback` more to
        start at a whole character and show :data:`MIN_CONTEXT_CHARS` characters."""
        start = max(0, n - self.window)
        text = self._decode(ids[start:n])
        while start > max(0, n - self.window - self.lookback) and not _sound(text):
            start -= 1
            text = self._decode(ids[start:n])
        self._start, self._context = start, text


MIN_CONTEXT_CHARS = 4
"""Characters of decoded context an :class:`IncrementalText` keeps before new tokens."""


def _sound(context: str) -> bool:
    return len(context) >= MIN_CONTEXT_CHARS and context[0] != "\ufffd"


class TextTracker:
    """Decodes output tokens and remembers how much text has been released."""

    def __init__(self, tokenizer: ChatTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.sent_text = ""
        self.sent_tokens = 0
        self._token_cache: dict[int, str] = {}
        self._released = IncrementalText(tokenizer.decode)
        """The text of the released prefix."""
        self._whole = IncrementalText(tokenizer.decode)
        """The text of the whole output (for stop strings)."""

    def text_of(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def token_text(self, tid: int) -> str:
        if tid not in self._token_cache:
            fn = getattr(self.tok, "token_text", None)
            self._token_cache[tid] = fn(tid) if fn else self.tok.decode([tid])
        return self._token_cache[tid]

    def sentence_start(self, output: list[int], pos: int) -> int:
        """Index of the first token of the sentence containing ``output[pos]``."""
        for j in range(pos - 1, -1, -1):
            if self.token_text(output[j]).rstrip(" ").endswith(SENTENCE_END):
                return j + 1
        return 0

    def stop_index(self, output: list[int]) -> int | None:
        """Character index of the first stop string in the output text, if any."""
        if not self.stop:
            return None
        text = self._whole.text(output, len(output))
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def tokens_before_stop(self, output: list[int]) -> list[int]:
        """The longest prefix of ``output`` whose text ends at or before the first stop string."""
        idx = self.stop_index(output)
        if idx is None:
            return list(output)
        k = len(output)
        while k > 0 and len(self.text_of(output[:k])) > idx:
            k -= 1
        return list(output[:k])

    def final_text(self, ids: list[int]) -> str:
        text = self.text_of(ids)
        idx = self.stop_index(ids) if self.stop else None
        return text if idx is None else text[:idx]

    def release(self, output: list[int], n: int) -> TextDelta | None:
        """Release the text of ``output[:n]`` minus what is already sent; ``None`` if nothing new."""
        text = self._released.text(output, n).rstrip("\ufffd")
        text = text[: len(text) - self._stop_prefix_len(text)]
        if len(text) <= len(self.sent_text) or not text.startswith(self.sent_text):
            return None
        delta = TextDelta(text[len(self.sent_text) :], tuple(output[self.sent_tokens : n]))
        self.sent_text, self.sent_tokens = text, n
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
