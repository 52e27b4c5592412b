"""A bound on the log lines a client can make a library write.

Some libraries log a warning for each bad input they see: uvicorn logs "Invalid HTTP request received." for
every connection that sends bytes which are not HTTP, and python-multipart logs each malformed body. So do
we, for a V2 JSON body that breaks the parser in a way it did not foresee (app/api/v2/json_worker.py). A client
could send those as fast as it can, and each costs it a few bytes while it costs us a line in the logs. The
client already learns what was wrong (a 400, or a closed connection), and our access log records each request
that reached the app. So these loggers keep a few lines per message in each window, and the next line let
through says how many were dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

# Loggers that write a line per bad input from a client (checked by tests/reliability/test_rel_hostile_logs.py).
CLIENT_TRIGGERED = ("uvicorn.error", "python_multipart.multipart", "effnet.v2")
BURST = 5  # lines of one message per window
WINDOW_S = 60.0


class RepeatLimit(logging.Filter):
    """At most `burst` records from each place in the code that logs (its file and line: python-multipart
    formats a byte offset into its messages, so neither the text nor the format string names the complaint)
    in each `window_s`. The records beyond are dropped and counted, and the first record let through in a
    later window says how many were dropped. Places in code are few, so the table stays small."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._lock = threading.Lock()  # decode threads log too (multipart bodies are parsed there)
        self._windows: dict[tuple[str, int], list] = {}  # key -> [window start, let through, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.pathname, record.lineno)
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.window_s:
                dropped = window[2] if window is not None else 0
                self._windows[key] = [now, 1, 0]
                if dropped:
                    record.msg = f"{record.msg} ({dropped} more like this in the last window were not logged)"
                return True
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            return False


def limit_client_triggered_logs(burst: int = BURST, window_s: float = WINDOW_S) -> None:
    """Puts one RepeatLimit on each logger of CLIENT_TRIGGERED; again, it replaces the one there. Call after
    uvicorn has configured its logging (uvicorn.Config does that), and in every process that parses client
    bytes (the JSON worker's too)."""
    for name in CLIENT_TRIGGERED:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RepeatLimit)]:
            logger.removeFilter(old)
        logger.addFilter(RepeatLimit(burst, window_s))
