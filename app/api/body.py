"""A request body read within bounds a client cannot stretch: size, time, rate, memory, concurrency.

* Size: refused (413) as soon as Content-Length or the bytes so far pass EFFNET_MAX_BODY_MB. The rest is
  then read and thrown away, up to EFFNET_MAX_DISCARD_MB, before answering: urllib and requests send the
  whole body before they read an answer, so answering mid-upload and closing looks to them like a reset,
  not a 413 (what nginx's lingering close is for).
* Time: the whole body within EFFNET_BODY_TIMEOUT_S, and after a grace second at least
  EFFNET_MIN_UPLOAD_KBPS; otherwise 408 and the connection closes. A stalled upload holds nothing for long.
* Memory: every chunk is charged to the data plane's budget before it is kept (503 when full), and
  given back when the request ends; so is what the body decompresses to (`take`).
* Concurrency: at most EFFNET_MAX_UPLOADS requests may be sending a body at once (503 beyond), a bound
  apart from the model queues, so slow uploads cannot fill a queue.
* A client that disconnects after its body is in cancels its work (`guard`): queued images are dropped
  before inference and counted on /metrics as skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from .uploads import check_media_type, media_type, parse_multipart
from ..core import tracing
from ..core.errors import BadRequest, ClientGone, Overloaded, PayloadTooLarge, RequestTimeout
from ..engine.facade import Plane

T = TypeVar("T")
GRACE_S = 1.0  # the minimum rate applies after this much time
TICK_S = 0.5  # how often a stalled upload is looked at

TIMEOUT_HEADERS = ("x-request-timeout-ms", "x-envoy-expected-rq-timeout-ms")


def client_timeout_s(request: Request) -> float | None:
    """The client's own deadline (ms from now in X-Request-Timeout-Ms, or Envoy's header), if it sent one."""
    for name in TIMEOUT_HEADERS:
        raw = request.headers.get(name)
        if raw is None:
            continue
        try:
            ms = float(raw)
        except ValueError:
            ms = float("nan")
        if not 0 < ms < 1e9:
            raise BadRequest(f"{name} must be a positive number of milliseconds")
        return ms / 1000.0
    return None


class Upload:
    """The body of one request, as a context manager that gives back everything it held."""

    def __init__(self, request: Request, plane: Plane) -> None:
        self.request, self.plane, self.settings = request, plane, plane.settings
        self._charged = 0
        self._counted = False
        self._done = asyncio.Event()  # set once the body is in (or will never be)
        self._ended = False  # the client's last body message has been received: nothing more will come

    async def __aenter__(self) -> Upload:
        if not self.plane.uploads.try_take():
            raise Overloaded(f"{self.settings.max_uploads} uploads are in progress; retry shortly", retry_after=1)
        self._counted = True
        return self

    async def __aexit__(self, *exc) -> None:
        self._finish_upload()
        if self._charged:
            self.plane.memory.give(self._charged)
            self._charged = 0

    def _finish_upload(self) -> None:
        if self._counted:
            self.plane.uploads.give()
            self._counted = False
        self._done.set()

    def _charge(self, n: int) -> None:
        self.take(n, "request bodies")

    # The request's share of the memory budget, for what its body turns into (a decompressed body: app/api/v2):
    # taken like the body's own bytes and given back with them when the request ends. Called from one
    # thread at a time (the loop, or the decode thread the request is waiting on).
    def take(self, n: int, what: str) -> None:
        self.plane.memory.take(n, what)
        self._charged += n

    def give(self, n: int) -> None:
        self.plane.memory.give(n)
        self._charged -= n

    # --- reading ---------------------------------------------------------------------
    async def images(self) -> list[bytes]:
        """The encoded images of a /classify request, in upload order: the raw body, or every `file` part.
        The media type is checked before a byte of the body is read."""
        ctype, params = media_type(self.request)
        kind = check_media_type(ctype)
        body = await self.body()
        if kind == "raw":
            return [body]
        self._charge(len(body))  # the parts are copies of the body's bytes
        # In a decode thread: python-multipart is pure Python, and even a bounded body is not free to parse.
        return await asyncio.get_running_loop().run_in_executor(self.plane.decode_pool, parse_multipart, body, params)

    async def body(self, limit: int | None = None) -> bytes:
        """The whole body, within EFFNET_MAX_BODY_MB or the route's own smaller `limit`."""
        with tracing.span("body") as span:
            body = await self._read(self.settings.max_body_bytes if limit is None else
                                    min(limit, self.settings.max_body_bytes))
            span.set(bytes=len(body))
            return body

    async def _read(self, limit: int) -> bytes:
        loop = asyncio.get_running_loop()
        start = loop.time()
        received = 0
        try:
            declared = self._declared_length()
            if declared is not None and declared > limit:
                await self._discard(0, declared, start)
                raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit}", limit_bytes=limit)
            chunks: list[bytes] = []
            async for chunk in self._chunks(start):
                received += len(chunk)
                if received > limit:
                    await self._discard(received, declared, start)
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes", limit_bytes=limit)
                try:
                    # Twice: the chunks and the joined body are both alive for a moment.
                    self._charge(2 * len(chunk))
                except Overloaded:
                    await self._discard(received, declared, start)
                    raise
                chunks.append(chunk)
            body = b"".join(chunks)
            del chunks
            self.give(received)  # the chunks are gone: one copy stays charged
            return body
        finally:
            self._finish_upload()

    def _declared_length(self) -> int | None:
        declared = self.request.headers.get("content-length")
        if declared is None:
            return None
        try:
            return int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None

    async def _chunks(self, start: float, received: int = 0):
        """The body's chunks as they arrive, enforcing the timeout and the minimum rate (counted from `start`
        over every byte of the body, the `received` already read included)."""
        loop = asyncio.get_running_loop()
        timeout, min_bps = self.settings.body_timeout_s, self.settings.min_upload_kbps * 1000
        pending: asyncio.Future | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(self.request.receive())
                elapsed = loop.time() - start
                if elapsed > timeout:
                    raise RequestTimeout(f"the body did not arrive within {timeout:g} s")
                if elapsed > GRACE_S and received < min_bps * (elapsed - GRACE_S):
                    raise RequestTimeout(f"the body arrives slower than {min_bps / 1000:g} kB/s")
                done, _ = await asyncio.wait({pending}, timeout=min(TICK_S, timeout - elapsed + 0.01))
                if not done:
                    continue
                message, pending = pending.result(), None
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                received += len(chunk)
                # Noted before the yield: the reader may refuse this very chunk and never come back for more.
                self._ended = not message.get("more_body", False)
                if chunk:
                    yield chunk
                if self._ended:
                    return
        finally:
            if pending is not None:
                pending.cancel()

    async def _discard(self, received: int, declared: int | None, start: float) -> None:
        """Read and drop the rest of an unwanted body, within the discard bound and the body timeout, so the
        client gets to read the answer; beyond the bound the connection is closed on it."""
        bound = self.settings.max_discard_bytes
        # A body that has ended has no rest: asking for more would wait for a disconnect (or the body timeout).
        if self._ended or (declared is not None and declared > bound):
            return
        try:
            # The rate check goes on over the whole body: a fresh count from 0 would call a client that was
            # uploading at full speed too slow, and close the connection on it mid-body.
            async for chunk in self._chunks(start, received):
                received += len(chunk)
                if received > bound:
                    return
        except (RequestTimeout, ClientGone):
            return

    # --- while the work runs -----------------------------------------------------------
    async def guard(self, work: Awaitable[T]) -> T:
        """Run the request's work; if the client disconnects once its body is in, cancel the work (its
        queued images are dropped before inference) and raise ClientGone."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request itself was cancelled (shutdown): so is its work
            task.cancel()
            watcher.cancel()
            raise
        if task.done():
            watcher.cancel()
            return task.result()
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - whatever the cancelled work raised, nobody reads it
            pass
        raise ClientGone()

    async def _disconnected(self) -> None:
        await self._done.wait()
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                return
