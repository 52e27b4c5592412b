"""Big JSON inference bodies parsed in a process of their own.

orjson and numpy's list-to-array conversion hold the GIL for their whole call: a 2.4 MB JSON FP32 tensor
(four 224 px images) takes ~25 ms to parse and ~12 ms to convert, and during a flood of them the decode
threads held the GIL ~36% of the time, so the event loop waited behind them (/health/live p99 60-170 ms on
2 cores). In a worker process they cost no GIL here at all. Small bodies (the common case: tritonclient
sends tensors as binary data) are parsed in the calling thread, where a process hop would cost more than
the parse. One worker: JSON parsing gets at most one core, whatever the flood.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from app.api.v2.codec import InferInput, parse_infer
from app.core.errors import Unavailable
from app.engine.manifest import Manifest

# Below this many bytes of JSON the parse (~2.5 ms) is cheaper than the trip to the worker.
IN_PROCESS_BYTES = 256 * 1024


def json_bytes(body: bytes, header_length: str | None) -> int:
    """How much of the body is JSON (the binary extension's header length, else all of it); 0 when the
    header length is malformed, which parse_infer refuses anyway."""
    if header_length is None:
        return len(body)
    try:
        return max(0, min(int(header_length), len(body)))
    except ValueError:
        return 0


def _parse_without_data(body: bytes, header_length: str | None, manifest: Manifest, max_images: int,
                        max_json: int) -> InferInput:
    """In the worker: parse, then drop the JSON values from the request (they are in `tensors` now), so
    only arrays travel back."""
    inp = parse_infer(body, header_length, manifest, max_images, max_json)
    for t in inp.request.get("inputs", []):
        if isinstance(t, dict):
            t.pop("data", None)
    return inp


class JsonWorker:
    """parse_infer, in a worker process for big JSON bodies. Thread-safe; the process starts on first use
    (spawned: forking a process that runs ONNX Runtime's threads is unsafe) and is restarted if it dies."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def parse(self, body: bytes, header_length: str | None, manifest: Manifest, max_images: int,
              max_json: int) -> InferInput:
        if json_bytes(body, header_length) <= IN_PROCESS_BYTES:
            return parse_infer(body, header_length, manifest, max_images, max_json)
        pool = self._running_pool()
        try:
            return pool.submit(_parse_without_data, body, header_length, manifest, max_images, max_json).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None  # the next big body starts a fresh worker
            raise Unavailable("the JSON parsing worker stopped; retry", retry_after=1) from None

    def _running_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
