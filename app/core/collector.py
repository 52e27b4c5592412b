"""Python's cyclic garbage collector, set for a server process once it has started.

Measured here (b0, two workers, one client, 20 s, `gc.callbacks`): a worker ran ~120 young collections
(0.3 ms each), 11 middle ones (0.4-0.9 ms) and one full collection that took 27 ms, inside a request: the
slowest answers of a quiet service. A full collection walks every object that startup made (modules,
FastAPI's routes, pydantic's schemas, manifests and labels), although none of them will ever be garbage.
So once a process has started, those objects are frozen out of every later collection.

The young generation keeps CPython's threshold: a young collection scans what grew since the last one, so a
larger threshold trades many 0.3 ms pauses for fewer longer ones (10,000 gave 3 ms each), which is what a
tail latency notices.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Freeze what exists now: call it when startup is over."""
    gc.collect()
    gc.freeze()
