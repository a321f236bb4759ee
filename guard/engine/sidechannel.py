"""The score channel: per-token monitor scores from vLLM's worker to the guard's front end.

vLLM's outputs carry token ids, not arbitrary per-token data, so scores travel beside them: one
append-only file per vLLM request (in a tmpfs directory when there is one), written by the worker
(:class:`ScoreWriter`) and read by the front end (:class:`ScoreReader`).

Record format (little-endian, fixed size for a request): ``int32 position, int32 flags,
float64 score[n]`` where ``n`` is the number of monitors the request asked to be scored, in the
order it gave them. ``position`` is absolute (prompt tokens included). ``flags & 1``: the
acting monitors fired at this position and the worker forced the reset token as the next token.
``flags & (2 << i)``: monitor ``i`` failed for this request (it raised, or returned a non-finite
score, here or earlier; its score is NaN and it no longer acts for the request). A score is NaN
when that monitor did not score the position.

Ordering contract: the worker appends the records of a step before that step's sampled tokens
leave the worker, so a reader that has received token ``n + 1`` finds the record of position
``n`` in the file. Writes are unbuffered ``write(2)`` calls of whole records.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

FORCED = 1
MAX_KEYS = 30
"""Monitors one request may ask for: each needs a failure bit of the int32 flags."""


def failed_bit(index: int) -> int:
    """The flag bit saying the ``index``-th monitor of a request failed."""
    return 2 << index


def _fmt(n: int) -> struct.Struct:
    return struct.Struct(f"<ii{n}d")


class ScoreWriter:
    """Appends records to one request's channel file (opened lazily, closed by :meth:`close`)."""

    def __init__(self, path: str | Path, keys: list[str]) -> None:
        self.path = str(path)
        self.fmt = _fmt(len(keys))
        self._fd: int | None = None

    def write(
        self, position: int, scores: list[float], forced: bool = False, failed: int = 0
    ) -> None:
        """``failed``: the OR of :func:`failed_bit` of the monitors that failed."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, self.fmt.pack(position, (FORCED if forced else 0) | failed, *scores))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ScoreReader:
    """Reads the records appended so far to one channel file."""

    def __init__(self, path: str | Path, keys: list[str]) -> None:
        self.path = str(path)
        self.keys = list(keys)
        self.fmt = _fmt(len(keys))
        self._file: BinaryIO | None = None
        """Opened once the worker has created the file; reads continue where the last one ended."""
        self._partial = b""

    def read(self) -> list[tuple[int, bool, dict[str, float], set[str]]]:
        """New records since the last call: ``(position, forced, {monitor key: score}, failed keys)``
        (NaN scores left out)."""
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - kept open until remove()
            except FileNotFoundError:
                return []
        data = self._partial + self._file.read()
        size = self.fmt.size
        whole = len(data) - len(data) % size
        self._partial = data[whole:]
        out = []
        for i in range(0, whole, size):
            pos, flags, *scores = self.fmt.unpack_from(data, i)
            out.append(
                (
                    pos,
                    bool(flags & FORCED),
                    {k: s for k, s in zip(self.keys, scores, strict=True) if not math.isnan(s)},
                    {k for i, k in enumerate(self.keys) if flags & failed_bit(i)},
                )
            )
        return out

    def remove(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
