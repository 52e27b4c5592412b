"""The admission side of a model's queue (app/engine/queue_room.py), on a real Batcher: who gets room
when it frees, how long anyone waits, and that nothing leaks when a waiter gives up."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from effnet_serve.core.errors import Overloaded, ShuttingDown
from effnet_serve.engine.batcher import Batcher


def model(x: np.ndarray) -> np.ndarray:
    return np.zeros((x.shape[0], 10), np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_full_queue_makes_reservers_wait_first_come_first_served():
    async def main():
        b = Batcher("m", model, max_queue=4)
        hold = b.reserve(4)  # full
        order = []

        async def want(n, tag):
            room = await b.room.reserve_within(n, 5.0)
            order.append(tag)
            return room

        first = asyncio.ensure_future(want(3, "first"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(want(1, "second"))  # would fit sooner, but may not overtake
        await asyncio.sleep(0)
        hold.release()  # 4 free: first (3) then second (1)
        rooms = await asyncio.gather(first, second)
        used = b.queued
        for r in rooms:
            r.release()
        return order, used, b.queued

    order, used, after = run(main())
    assert order == ["first", "second"] and used == 4 and after == 0


def test_stage_one_waiters_are_woken_newest_first_one_per_free_slot():
    async def main():
        b = Batcher("m", model, max_queue=2)
        hold = b.reserve(2)
        woken = []

        async def peek(tag):
            await b.room.wait_for_room(5.0)
            woken.append(tag)

        tasks = [asyncio.ensure_future(peek(i)) for i in range(5)]
        await asyncio.sleep(0.01)
        hold.release()  # two slots: the two newest waiters, nobody else
        await asyncio.sleep(0.01)
        first_wave = list(woken)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return first_wave, b.room.waiting

    first_wave, waiting = run(main())
    assert first_wave == [4, 3] and waiting == 0


def test_waiting_ends_in_overloaded_after_the_timeout_and_holds_nothing():
    async def main():
        b = Batcher("m", model, max_queue=2)
        hold = b.reserve(2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Overloaded):
            await b.room.reserve_within(1, 0.2)
        waited = loop.time() - t0
        with pytest.raises(Overloaded):
            await b.room.wait_for_room(0.0)
        with pytest.raises(Overloaded):
            await b.room.reserve_within(3, 5.0)  # more than the queue can ever hold: no wait
        state = (b.room.waiting, b.queued)
        hold.release()
        return waited, state, b.queued

    waited, state, after = run(main())
    assert 0.15 <= waited < 2.0 and state == (0, 2) and after == 0


def test_a_waiter_cancelled_in_the_instant_it_is_granted_gives_the_room_back():
    async def main():
        b = Batcher("m", model, max_queue=1)
        hold = b.reserve(1)
        task = asyncio.ensure_future(b.room.reserve_within(1, 5.0))
        await asyncio.sleep(0)
        hold.release()  # grants the waiter (its future is done) ...
        task.cancel()  # ... and its client leaves before it runs
        await asyncio.gather(task, return_exceptions=True)
        return b.queued, b.room.waiting

    assert run(main()) == (0, 0)


def test_closing_fails_every_waiter_with_shutting_down():
    async def main():
        b = Batcher("m", model, max_queue=1)
        b.reserve(1)
        r = asyncio.ensure_future(b.room.reserve_within(1, 5.0))
        p = asyncio.ensure_future(b.room.wait_for_room(5.0))
        await asyncio.sleep(0)
        b.room.close()
        return await asyncio.gather(r, p, return_exceptions=True)

    outcomes = run(main())
    assert all(isinstance(o, ShuttingDown) for o in outcomes)


def test_a_gated_request_does_not_queue_behind_the_line_again_while_there_is_room():
    """The admission gate queues a request fairly; the route's own stage one must not send it to the back
    of the line again (that once starved every request of a retry storm)."""
    async def main():
        b = Batcher("m", model, max_queue=2)
        one, two = b.reserve(1), b.reserve(1)
        waiters = [asyncio.ensure_future(b.room.wait_for_room(5.0)) for _ in range(3)]
        await asyncio.sleep(0)
        one.release()  # one slot: the newest waiter goes, two stay in line
        await asyncio.sleep(0)
        in_line = b.room.waiting
        with pytest.raises(Overloaded):
            await b.room.wait_for_room(0.05)  # a newcomer queues behind them (and times out here)
        await b.room.wait_for_room(0.05, in_line=False)  # an already-gated request: room exists, it goes
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        two.release()
        return in_line

    assert run(main()) == 2


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_reserver_that_leaves_the_head_of_the_line_lets_the_one_behind_it_have_the_free_room(how):
    """Room for the second reserver all along (2 of 4 held, it wants 1), but the first (wants 3) is ahead of it
    and may not be overtaken. When the first gives up (its wait ends, or its client leaves), the second gets
    the room at once, not an Overloaded at the end of its own wait: nothing else (no batch, no release) would
    hand the room out on a quiet queue."""
    async def main():
        b = Batcher("m", model, max_queue=4)
        hold = b.reserve(2)  # two images still being decoded, say
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(b.room.reserve_within(3, 0.1 if how == "timeout" else 5.0))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(b.room.reserve_within(1, 3.0))
        await asyncio.sleep(0.01)
        assert b.room.waiting == 2
        t0 = loop.time()
        if how == "cancel":
            first.cancel()
        outcome = (await asyncio.gather(first, return_exceptions=True))[0]
        room = await second
        waited = loop.time() - t0
        room.release()
        hold.release()
        return outcome, waited, b.queued, b.room.waiting

    outcome, waited, queued, waiting = run(main())
    assert isinstance(outcome, Overloaded if how == "timeout" else asyncio.CancelledError)
    assert waited < 1.0 and queued == 0 and waiting == 0
