"""Breaking tag text in untrusted content, so that chat content can never open or close a
reasoning section or spell a special token. Used by the chat tokenizer (special tokens) and by
request preparation (reasoning tags that are plain text).
"""

from __future__ import annotations

ZWJ = "\u200d"
"""Zero-width joiner inserted after the first character of a tag found in chat content."""


def neutralise_text(text: str, tags: tuple[str, ...]) -> str:
    """Break every occurrence of a tag in ``text`` with a zero-width joiner after its first character.

    Used for tags that are plain text (``<think>``), which tokenizing with special tokens split
    cannot neutralise; the result renders the same to a human but never matches the tag.
    """
    for tag in tags:
        if len(tag) > 1 and tag in text:
            text = text.replace(tag, tag[0] + ZWJ + tag[1:])
    return text
