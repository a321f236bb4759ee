"""Token ids -> answer text, for the controller: release, stop strings, sentence starts.

Invariant: ``sent_text`` (what the client holds) is always a prefix of the text of the current
output, never ends inside a multi-byte character, and never includes the start of a stop string.
"""

from __future__ import annotations

from guard.controller.events import TextDelta
from guard.engine.base import ChatTokenizer

SENTENCE_END = (".", "!", "?", "\n", "。", "！", "？")


class TextTracker:
    """Decodes output tokens and remembers how much text has been released."""

    def __init__(self, tokenizer: ChatTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.sent_text = ""
        self.sent_tokens = 0
        self._token_cache: dict[int, str] = {}

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
        text = self.text_of(output)
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
        text = self.text_of(output[:n]).rstrip("\ufffd")
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
