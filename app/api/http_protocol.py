"""uvicorn's HTTP/1.1 protocol (httptools) with the bounds it lacks outside a route's body reader.

uvicorn reads a request's line and headers with no size cap and no time limit, and counts a connection
against limit_concurrency (EFFNET_MAX_CONNECTIONS) from the moment it opens: sockets that trickle headers,
or send nothing at all, hold memory for ever and, once there are enough of them, turn every request into
a 503, the liveness probe's included. Here:

* Size: the request line and headers of one request may take EFFNET_MAX_HEADER_KB; beyond, 431 and close.
* Time: they must be in within EFFNET_HEADER_TIMEOUT_S of the connection opening (first request) or of the
  request's first byte (later ones); otherwise 408 and close, or just close if nothing came. The idle time
  between requests is uvicorn's keep-alive timeout (EFFNET_KEEPALIVE_S).
* After the head: chunked trailers get the head's size cap (httptools keeps each one whole until it ends),
  and the rest of a body nobody reads, once the answer is out, the head's time (while a route reads a body,
  app/api/body.py bounds it).
* Count: a connection counts against EFFNET_MAX_CONNECTIONS only while it has a request in progress. One
  between requests (just opened, idle, or still sending headers) is counted apart, at most as many again per
  process; a new one beyond that closes the one that has waited longest, so a crowd of slow sockets cannot
  lock out a client that sends its request at once (a probe), and holds at most that many heads in memory.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# After a refusal, the most a connection is kept, and the most it reads, to drop what the client still sends.
LINGER_S, LINGER_BYTES = 2.0, 1 << 20


class Waiting:
    """One server's connections that are between requests, the longest waiting first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = True  # False once the server shuts down: every connection is then uvicorn's to close
        self._conns: dict[BoundedHttp, None] = {}  # insertion-ordered: the oldest first

    def add(self, conn: BoundedHttp) -> None:
        self._conns[conn] = None
        while len(self._conns) > self.limit:
            oldest = next(iter(self._conns))
            del self._conns[oldest]
            oldest.transport.close()

    def discard(self, conn: BoundedHttp) -> None:
        self._conns.pop(conn, None)

    def hand_over(self, connections: set) -> None:
        """At shutdown: into uvicorn's own set, which closes the idle ones and waits for the rest."""
        self.open = False
        connections.update(self._conns)
        self._conns.clear()


class BoundedHttp(HttpToolsProtocol):
    """Bound by `bounded_http`, one subclass per server: its limits and its `Waiting` set."""

    max_header_bytes: int
    header_timeout_s: float
    waiting: Waiting

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request's line and headers
        self._head_bytes = 0
        self._gap = 0  # bytes since the last body byte, once the head is in: chunk framing, or trailers
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = False  # refused: what still comes is dropped until the close
        self._dropped = 0

    # --- counted or waiting -------------------------------------------------------------
    def _wait(self) -> None:
        if self.waiting.open:
            self.connections.discard(self)
            self.waiting.add(self)

    def _count(self) -> None:
        self.waiting.discard(self)
        self.connections.add(self)

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    # --- uvicorn's hooks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait()
        self._arm()  # the first request's headers are timed from the connection's start

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Only the head's share of each read is fed while the cap has room: if the head ends within it,
        # what follows (a body, the next request) goes on as usual.
        if self._lingering:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        while data and not self.transport.is_closing():
            if not self._in_head:
                self._gap += len(data)
                super().data_received(data)  # on_body sets _gap back to 0
                if self._gap > self.max_header_bytes and not self._in_head:  # httptools buffers trailers whole
                    self.transport.close()  # the request is answered, or its route is waiting: nobody to tell
                return
            room = self.max_header_bytes - self._head_bytes
            if room <= 0:
                self._refuse(431, "request_header_too_large",
                             f"the request line and headers exceed {self.max_header_bytes} bytes")
                return
            part, data = data[:room], data[room:]
            self._head_bytes += len(part)
            super().data_received(part)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a later request: timed from its first byte (the idle time before is keep-alive's)

    def on_headers_complete(self) -> None:
        self._in_head, self._gap = False, 0
        self._disarm()
        self._count()  # before uvicorn's limit_concurrency check, which counts this connection
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._gap = 0
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._in_head, self._head_bytes = True, 0
        if not self._busy():  # the end of a body read by nobody, which put off uvicorn's keep-alive timer:
            self._arm()  # the next request is timed from here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._busy():  # no pipelined request started
            self._wait()
            if not self._in_head:  # answered, and the request's body still coming: nobody reads it, it gets
                self._arm()  # the head's time to end (uvicorn would take it for ever, byte by byte)

    # --- timeouts and refusals ----------------------------------------------------------
    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._in_head and self._head_bytes:
            self._refuse(408, "request_timeout",
                         f"the request headers did not arrive within {self.header_timeout_s:g} s")
        else:  # nothing was asked, or it was answered already: nothing to say
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` with the JSON API's error body and close; just close when a response of an
        earlier (pipelined) request is still being written, as the two would interleave."""
        self._disarm()
        if self._busy():
            self.transport.close()
            return
        body = orjson.dumps({"error": {"code": code, "message": message}})
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
        # A lingering close, as nginx's: closed at once on a client that is still sending, the socket would
        # answer its next bytes with a reset, which can destroy the answer before the client reads it. So
        # the answer and a FIN go out, what still comes is dropped, and the close follows the client's
        # own, or LINGER_S, or LINGER_BYTES dropped.
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def bounded_http(max_header_bytes: int, header_timeout_s: float, max_waiting: int) -> type[BoundedHttp]:
    """The protocol class for one server (uvicorn.Config(http=...) takes a class, and builds one
    instance a connection)."""
    return type("BoundedHttp", (BoundedHttp,), {
        "max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s,
        "waiting": Waiting(max_waiting)})
