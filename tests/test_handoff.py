"""guard.handoff: events from a worker thread reach their asyncio queues in order, with one loop
wake-up for a burst."""

from __future__ import annotations

import asyncio
import threading

from guard.handoff import Handoff


class _Counting(Handoff):
    flushes = 0

    def _flush(self) -> None:
        self.flushes += 1
        super()._flush()


def test_a_burst_from_another_thread_arrives_in_order_with_one_wake_up():
    async def main() -> tuple[list, list, int]:
        handoff = _Counting(asyncio.get_running_loop())
        a, b = asyncio.Queue(), asyncio.Queue()
        # The burst is put while the loop is busy (this coroutine holds it), as a worker pass is.
        t = threading.Thread(target=lambda: [handoff.put(a if i % 2 else b, i) for i in range(200)])
        t.start()
        t.join()
        got_a = [await a.get() for _ in range(100)]
        got_b = [await b.get() for _ in range(100)]
        return got_a, got_b, handoff.flushes

    got_a, got_b, flushes = asyncio.run(main())
    assert got_a == list(range(1, 200, 2)) and got_b == list(range(0, 200, 2))
    assert flushes == 1


def test_puts_while_flushing_are_not_lost():
    async def main() -> list:
        handoff = Handoff.of(asyncio.get_running_loop())
        assert Handoff.of(asyncio.get_running_loop()) is handoff
        q: asyncio.Queue = asyncio.Queue()

        def produce() -> None:
            for i in range(5000):
                handoff.put(q, i)

        threading.Thread(target=produce).start()
        return [await asyncio.wait_for(q.get(), 60) for _ in range(5000)]

    assert asyncio.run(main()) == list(range(5000))
