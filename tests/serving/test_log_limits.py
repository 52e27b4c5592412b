"""RepeatLimit (app/core/log_limits.py): the lines a client can make a library log are bounded per place in
the code and window, and what was dropped is said on the next line let through."""

from __future__ import annotations

import logging

import pytest

from effnet_serve.api.v2.json_worker import JsonWorker
from effnet_serve.core.log_limits import CLIENT_TRIGGERED, RepeatLimit, limit_client_triggered_logs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(line: int, msg: str = "Found invalid character 13 in header at 12") -> logging.LogRecord:
    return logging.LogRecord("python_multipart.multipart", logging.WARNING, "/lib/multipart.py", line, msg, None, None)


def test_each_place_in_the_code_gets_its_burst_per_window_and_the_next_window_says_what_was_dropped():
    clock = Clock()
    limit = RepeatLimit(burst=3, window_s=60.0, clock=clock)
    # The same place with a different offset in the text is the same complaint.
    passed = [limit.filter(record(1014, f"Did not find CR at end of boundary ({i})")) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(record(1245)), "another place in the code has a burst of its own"
    clock.now += 59.9
    assert not limit.filter(record(1014)), "still the first window"
    clock.now += 0.1
    later = record(1014, "Did not find CR at end of boundary (5)")
    assert limit.filter(later)
    assert later.getMessage() == "Did not find CR at end of boundary (5) (8 more like this in the last window were not logged)"
    quiet = record(1245)
    assert limit.filter(quiet) and quiet.getMessage() == "Found invalid character 13 in header at 12", \
        "nothing was dropped there: nothing to say"
    again = record(1014)
    assert limit.filter(again) and "not logged" not in again.getMessage(), "the count is said once"


def test_a_record_with_arguments_keeps_them():
    limit = RepeatLimit(burst=1, window_s=1.0, clock=Clock())
    r = logging.LogRecord("uvicorn.error", logging.WARNING, "/lib/h11.py", 7, "Invalid %s: %d", ("x", 5), None)
    assert limit.filter(r) and r.getMessage() == "Invalid x: 5"


@pytest.fixture
def client_loggers():
    saved = {n: list(logging.getLogger(n).filters) for n in CLIENT_TRIGGERED}
    yield
    for name, filters in saved.items():
        logging.getLogger(name).filters[:] = filters


def test_the_limit_is_put_once_on_each_logger_a_client_can_reach(client_loggers):
    limit_client_triggered_logs(burst=2)
    limit_client_triggered_logs(burst=2)
    for name in CLIENT_TRIGGERED:
        limits = [f for f in logging.getLogger(name).filters if isinstance(f, RepeatLimit)]
        assert len(limits) == 1 and limits[0].burst == 2
    logger = logging.getLogger("python_multipart.multipart")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for i in range(5):
            logger.warning("Did not find LF at end of boundary (%d)", i)
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 2


def limits_on(name: str) -> list[str]:
    return [type(f).__name__ for f in logging.getLogger(name).filters]


def test_the_json_worker_process_limits_its_logs_too():
    """Big V2 JSON bodies are parsed in a process of their own (app/api/v2/json_worker.py), whose logging
    starts afresh: the limit is put on there as it starts."""
    worker = JsonWorker()
    try:
        assert worker._running_pool().submit(limits_on, "effnet.v2").result(timeout=120) == ["RepeatLimit"]
    finally:
        worker.close()
