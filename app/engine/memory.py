"""A budget in bytes for what requests hold in memory at once: bodies as they arrive, decoded pixels.

Counts alone (requests, images) do not bound memory: 256 admitted requests x 20 MB bodies is 5 GB, and a
150 kB 16-bit PNG can decode to hundreds of MB. Every body chunk and every image's decoded size is taken
from this budget before the memory is used and given back when it is freed; what does not fit is refused
(503 + Retry-After) instead of waited for, so a burst cannot stack up behind it. Thread-safe: images are
charged from the decode pool's threads.
"""

from __future__ import annotations

import fcntl
import os
import threading

from ..core.errors import OverBudget


class MemoryBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self._used = 0
        self._lock = threading.Lock()
        self.peak = 0

    @property
    def used(self) -> int:
        return self._used

    def take(self, n: int, what: str) -> None:
        """Charge n bytes or raise OverBudget (nothing charged)."""
        with self._lock:
            if self._used + n > self.limit:
                raise OverBudget(
                    f"the server is holding its limit of {self.limit >> 20} MB for requests in flight ({what}); "
                    "retry shortly", retry_after=1,
                )
            self._used += n
            self.peak = max(self.peak, self._used)

    def give(self, n: int) -> None:
        with self._lock:
            self._used -= n


class SlotTable:
    """Per-worker counts in shared memory (one slot each) and the file whose lock guards them, made by the
    supervisor and handed to each worker as it starts (spawn pickles the array's shared memory, not a copy).

    The lock is an flock, not the semaphore multiprocessing pairs with an Array: the kernel lets go of an flock
    when its holder dies, where a semaphore that an OOM-killed worker held stays held for good, and the next
    charge in every other worker, and the supervisor's restart, would wait on it for ever."""

    def __init__(self, ctx, n: int, lock_path: str) -> None:
        self.values = ctx.RawArray("q", n)
        self.lock_path = lock_path
        with open(lock_path, "a"):
            pass

    def lock(self) -> _FileLock:
        return _FileLock(self.lock_path)


class _FileLock:
    """One process's handle on a SlotTable's lock: a threading lock for its own threads (an flock is held per
    open file, so a second thread of the same process would pass it), then the flock for the other processes."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._threads = threading.Lock()

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()

    def close(self) -> None:
        os.close(self._fd)


class SharedSlots:
    """A count held by several worker processes at once (app/supervisor.py): each worker adds to its own slot
    of a SlotTable, under the table's one lock, and an addition is refused when the slots together would pass
    the limit. So a limit means what it means in one process, however many workers there are, and a worker
    that dies leaves nothing behind: the supervisor zeroes its slot (`clear`) before starting its
    replacement."""

    def __init__(self, table: SlotTable, index: int) -> None:
        self._index = index
        self._lock = table.lock()
        self._raw = table.values

    def total(self) -> int:
        with self._lock:
            return sum(self._raw)

    def add_within(self, n: int, limit: int) -> int | None:
        """Add n to this worker's slot if the total stays within limit: the new total, or None (nothing added)."""
        with self._lock:
            total = sum(self._raw) + n
            if total > limit:
                return None
            self._raw[self._index] += n
            return total

    def sub(self, n: int) -> None:
        with self._lock:
            self._raw[self._index] -= n

    @staticmethod
    def clear(table: SlotTable, index: int) -> None:
        """Forget what a dead worker held."""
        lock = table.lock()
        try:
            with lock:
                table.values[index] = 0
        finally:
            lock.close()


class SharedBudget(MemoryBudget):
    """The memory budget over several worker processes (SharedSlots)."""

    clear = staticmethod(SharedSlots.clear)

    def __init__(self, limit_bytes: int, slots: SlotTable, index: int) -> None:
        self.limit = int(limit_bytes)
        self.peak = 0
        self._shared = SharedSlots(slots, index)

    @property
    def used(self) -> int:
        return self._shared.total()

    def take(self, n: int, what: str) -> None:
        total = self._shared.add_within(n, self.limit)
        if total is None:
            raise OverBudget(
                f"the server is holding its limit of {self.limit >> 20} MB for requests in flight ({what}); "
                "retry shortly", retry_after=1,
            )
        self.peak = max(self.peak, total)

    def give(self, n: int) -> None:
        self._shared.sub(n)


class UploadCount:
    """Requests still sending their body (EFFNET_MAX_UPLOADS): a slow upload holds a connection, a task and
    its bytes so far, so their number is bounded apart from the bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def try_take(self) -> bool:
        if self._used >= self.limit:
            return False
        self._used += 1
        return True

    def give(self) -> None:
        self._used -= 1


class SharedUploadCount(UploadCount):
    """The upload count over several worker processes (SharedSlots)."""

    clear = staticmethod(SharedSlots.clear)

    def __init__(self, limit: int, slots: SlotTable, index: int) -> None:
        self.limit = int(limit)
        self._shared = SharedSlots(slots, index)

    @property
    def used(self) -> int:
        return self._shared.total()

    def try_take(self) -> bool:
        return self._shared.add_within(1, self.limit) is not None

    def give(self) -> None:
        self._shared.sub(1)
