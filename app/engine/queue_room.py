"""The admission side of one model's queue: room held for images still being decoded, and the requests
waiting for room.

A request that finds the queue full may wait a little (bounded by the caller) instead of being refused at
once. Under a retry storm that is what keeps refusals from eating the CPU the model needs: a client told
"no" after a wait comes back at most that often, where one told "no" at once comes back in microseconds.

Two kinds of waiting, for the two admission stages of the data plane, in two lines:
* `reserve_within(n)` (once the image count is known): all n slots or none, first come first served.
  This line is served first: its requests are admitted already and hold a read body.
* `wait_for_room` (before the body is read): returns once at least one image would fit; holds nothing,
  so slow uploads cannot pin queue room. Woken one per free slot, after the first line, newest first:
  under sustained overload the newest waiter gets the slot and the oldest ones time out, so whoever is
  admitted has waited little (latency stays near one queue drain) while everyone refused has waited the
  whole admission wait (so retries stay rare). Without overload nobody waits and the order is moot.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import Overloaded, ShuttingDown

# The batcher this room belongs to (its name, its queue, enqueue_reserved, wake); not imported: batcher imports us.
Batcher = Any


@dataclass
class _Waiter:
    n: int  # images wanted; 0 = only waiting for room to exist (stage one)
    future: asyncio.Future


class QueueRoom:
    def __init__(self, batcher: Batcher, capacity: int, queued_items: Callable[[], int]) -> None:
        self._batcher = batcher
        self.capacity = capacity
        self._queued_items = queued_items
        self.reserved = 0
        self.closing = False
        # what a request refused by a closed room gets (close() may say why): the server's shutdown by default
        self.refusal: Callable[[], ShuttingDown] = lambda: ShuttingDown("the server is shutting down")
        self._reservers: collections.deque[_Waiter] = collections.deque()  # stage two
        self._peekers: collections.deque[_Waiter] = collections.deque()  # stage one

    @property
    def used(self) -> int:
        return self._queued_items() + self.reserved

    @property
    def waiting(self) -> int:
        return len(self._reservers) + len(self._peekers)

    def _full(self, name: str) -> Overloaded:
        return Overloaded(f"model {name!r} queue is full ({self.capacity} images); retry shortly")

    def reserve(self, n: int) -> Reservation:
        """All n slots now, or Overloaded."""
        if self.closing:
            raise self.refusal()
        if self.used + n > self.capacity:
            raise self._full(self._batcher.name)
        self.reserved += n
        return Reservation(self._batcher, self, n)

    async def reserve_within(self, n: int, timeout: float) -> Reservation:
        """All n slots, waiting up to `timeout` s behind earlier waiters; Overloaded when they never come."""
        if n > self.capacity:
            raise self._full(self._batcher.name)
        if not self._reservers or self.closing:
            try:
                return self.reserve(n)
            except Overloaded:
                if timeout <= 0:
                    raise
        return await self._wait(n, timeout)

    async def wait_for_room(self, timeout: float, in_line: bool = True) -> None:
        """Return once one more image would fit (nothing is held); Overloaded after `timeout` s.
        `in_line=False`: a request that has already waited its turn (the admission gate) does not queue
        behind the others again while there is room."""
        if self.closing:
            raise self.refusal()
        if self.used < self.capacity and (not in_line or not self.waiting):  # nobody ahead in either line
            return
        if timeout <= 0:
            raise self._full(self._batcher.name)
        await self._wait(0, timeout)

    async def _wait(self, n: int, timeout: float):
        waiter = _Waiter(n, asyncio.get_running_loop().create_future())
        (self._reservers if n else self._peekers).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except TimeoutError:
            self._leave(waiter)
            raise self._full(self._batcher.name) from None
        except BaseException:  # cancelled: the client went away
            self._leave(waiter)
            raise

    def _leave(self, waiter: _Waiter) -> None:
        """Out of the line; room granted in the same instant the caller gave up goes back. A reserver that
        leaves the head of its line lets the ones behind it have the room that is free now (the line is served
        in order: they may have waited for room that was there only because it was in their way)."""
        f = waiter.future
        if f.done() and not f.cancelled() and f.exception() is None:
            if isinstance(f.result(), Reservation):
                f.result().release()
        else:
            f.cancel()
        line = self._reservers if waiter.n else self._peekers
        if waiter in line:
            was_first = line[0] is waiter
            line.remove(waiter)
            if was_first and waiter.n:
                self.grant()

    def grant(self) -> None:
        """Room may have freed: hand it to the reservers in order, then wake stage-one waiters, newest first,
        one per slot still free (a woken one holds nothing, so waking them all would send a herd to read
        bodies for room only a few of them can get)."""
        while self._reservers:
            w = self._reservers[0]
            if w.future.done():
                self._reservers.popleft()
            elif self.closing:
                self._reservers.popleft()
                w.future.set_exception(self.refusal())
            elif self.used + w.n <= self.capacity:
                self._reservers.popleft()
                self.reserved += w.n
                w.future.set_result(Reservation(self._batcher, self, w.n))
            else:
                return  # in order: nobody overtakes the first reserver
        free = self.capacity - self.used
        while self._peekers and (free > 0 or self.closing):
            w = self._peekers.pop()  # newest first: see the module docstring
            if w.future.done():
                continue
            if self.closing:
                w.future.set_exception(self.refusal())
                continue
            w.future.set_result(None)
            free -= 1

    def close(self, refusal: Callable[[], ShuttingDown] | None = None) -> None:
        """Take nothing more; every waiter gets `refusal()` (default: the server's shutdown)."""
        if refusal is not None:
            self.refusal = refusal
        self.closing = True
        self.grant()


class Reservation:
    """Queue room held for one request's images while they are decoded; a context manager that gives
    back whatever was not submitted when it closes."""

    def __init__(self, batcher: Batcher, room: QueueRoom, n: int) -> None:
        self._batcher, self._room, self._left = batcher, room, n

    async def submit(self, xs, arrived: float | None = None, timeout_s: float | None = None, done=None):
        """`done`: a hook per image for the inference thread (batcher.py, `_Item.done`)."""
        if len(xs) > self._left:
            raise ValueError(f"{len(xs)} images submitted on a reservation of {self._left}")
        self._left -= len(xs)
        self._room.reserved -= len(xs)
        return await self._batcher.enqueue_reserved(xs, arrived, timeout_s, done)

    def release(self) -> None:
        if self._left:
            self._room.reserved -= self._left
            self._left = 0
            self._batcher.wake()  # a partial batch may have been waiting for these
            self._room.grant()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
