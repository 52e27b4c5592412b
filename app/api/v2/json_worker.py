"""Big JSON inference bodies parsed in a process of their own.

orjson and numpy's list-to-array conversion hold the GIL for their whole call: a 2.4 MB JSON FP32 tensor
(four 224 px images) takes ~25 ms to parse and ~12 ms to convert, and during a flood of them the decode
threads held the GIL ~36% of the time, so the event loop waited behind them (/health/live p99 60-170 ms on
2 cores). In a worker process they cost no GIL here at all. Small bodies (the common case: tritonclient
sends tensors as binary data) are parsed in the calling thread, where a process hop would cost more than
the parse. One worker: JSON parsing gets at most one core, whatever the flood.

What a flood of big JSON bodies can hold is bounded: the event loop awaits the worker's answer, so no
thread waits on it (the decode threads that /classify and gRPC share stay free); at most
EFFNET_JSON_WORKER_QUEUE bodies wait for it or run in it (503 + Retry-After beyond), and each waits at most
EFFNET_JSON_WORKER_TIMEOUT_S (503). Whatever the input, the worker answers a parse or a 400, never a 500:
only the fields the answer needs travel back, so a JSON header nested 900 deep cannot break the pickling.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .codec import InferInput, parse_infer
from ...core.errors import ApiError, BadRequest, Overloaded, Unavailable
from ...core.lifetime import die_with_parent
from ...core.log_limits import limit_client_triggered_logs
from ...engine.manifest import Manifest

log = logging.getLogger("effnet.v2")

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


def wants_worker(body: bytes, header_length: str | None) -> bool:
    return json_bytes(body, header_length) > IN_PROCESS_BYTES


def parse_checked(body: bytes, header_length: str | None, manifest: Manifest, max_images: int,
                  max_json: int) -> InferInput:
    """parse_infer, where anything it did not foresee in client input is a 400, not a 500 and a traceback."""
    try:
        return parse_infer(body, header_length, manifest, max_images, max_json)
    except ApiError:
        raise
    except (RecursionError, MemoryError, TypeError, ValueError, KeyError, AttributeError) as exc:
        log.warning("unparseable inference request: %s", type(exc).__name__)
        raise BadRequest("the inference request could not be parsed") from None


def _slim(inp: InferInput) -> InferInput:
    """What the answer needs of the JSON header (encode_infer: the id; the input's name, type and shape for
    whoever looks), without the values (they are in `tensors` now) or anything else the client nested there."""
    req, t = inp.request, inp.request["inputs"][0]
    head = {k: t[k] for k in ("name", "datatype") if isinstance(t.get(k), str)}
    head["shape"] = t["shape"]  # validated: a list of integers
    slim = {"inputs": [head]}
    if isinstance(req.get("id"), str):
        slim["id"] = req["id"]
    return InferInput(slim, inp.tensors, inp.images, inp.outputs)


def _start_child(parent_pid: int) -> None:
    """The parser process ends with the process that started it, an OOM kill included: nothing else would
    end it (it waits on a queue whose write end it holds itself)."""
    die_with_parent(parent_pid)
    limit_client_triggered_logs()


def _parse_in_worker(body: bytes, header_length: str | None, manifest: Manifest, max_images: int,
                     max_json: int) -> InferInput:
    return _slim(parse_checked(body, header_length, manifest, max_images, max_json))


class JsonWorker:
    """parse_infer, in a worker process for big JSON bodies. The process starts on first use (spawned: forking
    a process that runs ONNX Runtime's threads is unsafe) and is restarted if it dies. `parse_async` is for
    the event loop (bounded waiting, no thread held); `parse` blocks its calling thread (tools, tests)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.waiting = 0  # bodies sent to the worker and not answered yet (touched on the event loop only)

    def parse(self, body: bytes, header_length: str | None, manifest: Manifest, max_images: int,
              max_json: int) -> InferInput:
        if not wants_worker(body, header_length):
            return parse_checked(body, header_length, manifest, max_images, max_json)
        future, pool = self._submit(body, header_length, manifest, max_images, max_json)
        try:
            return future.result()
        except BrokenProcessPool:
            raise self._broken(pool) from None

    async def parse_async(self, body: bytes, header_length: str | None, manifest: Manifest, max_images: int,
                          max_json: int, *, timeout_s: float, max_waiting: int) -> InferInput:
        """In the worker; 503 when `max_waiting` bodies are there already or this one is not parsed within
        `timeout_s` (it is then dropped if it has not started)."""
        if self.waiting >= max_waiting:
            raise Overloaded(f"{max_waiting} JSON bodies are waiting to be parsed; retry shortly, or send "
                             "tensors as binary data", retry_after=1)
        self.waiting += 1
        try:
            future, pool = self._submit(body, header_length, manifest, max_images, max_json)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
            except TimeoutError:
                raise Unavailable(f"the JSON body was not parsed within {timeout_s:g} s; retry shortly, or send "
                                  "tensors as binary data", retry_after=1) from None
            except BrokenProcessPool:
                raise self._broken(pool) from None
        finally:
            self.waiting -= 1

    def _submit(self, *args) -> tuple[Future, ProcessPoolExecutor]:
        pool = self._running_pool()
        try:
            return pool.submit(_parse_in_worker, *args), pool
        except BrokenProcessPool:  # died between two requests
            raise self._broken(pool) from None

    def _broken(self, pool: ProcessPoolExecutor) -> Unavailable:
        with self._lock:
            if self._pool is pool:
                self._pool = None  # the next big body starts a fresh worker
        return Unavailable("the JSON parsing worker stopped; retry", retry_after=1)

    def _running_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_child, initargs=(os.getpid(),))
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            processes = list((getattr(pool, "_processes", None) or {}).values())  # where concurrent.futures keeps them
            pool.shutdown(wait=False, cancel_futures=True)
            # Its worker may never see the executor's stop sentinel (seen here: one stop in ~8 under a flood of
            # big bodies), and multiprocessing joins every child at exit: this process would never exit. What
            # it was parsing is for a request nobody will answer now.
            for p in processes:
                p.kill()
