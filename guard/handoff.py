"""Events from the engine worker's thread to asyncio queues, with one loop wake-up per burst.

The worker emits one event per generation per step; waking the event loop once per event
(``call_soon_threadsafe``: a lock and a write to the loop's self-pipe each) costs the loop more
than the events themselves at tens of concurrent streams. A :class:`Handoff` collects events from
any thread and schedules one flush on the loop for everything emitted until that flush runs, so
a worker pass over N streams wakes the loop about once, not N times.

Contract: events put for one queue arrive in that queue in the order they were put; nothing is
lost while the loop runs; after the loop closed, puts are dropped (nobody listens any more).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from typing import Any

_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Handoff] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


class Handoff:
    """Puts onto asyncio queues of one loop from other threads (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: deque[tuple[asyncio.Queue, Any]] = deque()
        self._scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Handoff:
        """The handoff of ``loop`` (one per loop, made on first use)."""
        with _lock:
            handoff = _by_loop.get(loop)
            if handoff is None:
                handoff = _by_loop[loop] = cls(loop)
            return handoff

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """``queue.put_nowait(item)`` on the loop, soon; callable from any thread."""
        self._pending.append((queue, item))
        if self._scheduled:
            return
        self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._pending.clear()

    def _flush(self) -> None:
        # Cleared before draining: an item appended after the last pop schedules a new flush.
        self._scheduled = False
        pending = self._pending
        while pending:
            queue, item = pending.popleft()
            queue.put_nowait(item)
