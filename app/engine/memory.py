"""A budget in bytes for what requests hold in memory at once: bodies as they arrive, decoded pixels.

Counts alone (requests, images) do not bound memory: 256 admitted requests x 20 MB bodies is 5 GB, and a
150 kB 16-bit PNG can decode to hundreds of MB. Every body chunk and every image's decoded size is taken
from this budget before the memory is used and given back when it is freed; what does not fit is refused
(503 + Retry-After) instead of waited for, so a burst cannot stack up behind it. Thread-safe: images are
charged from the decode pool's threads.
"""

from __future__ import annotations

import threading

from app.core.errors import OverBudget


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
