"""Messages between a worker and the engine: a 4-byte big-endian length, then a pickled tuple.

Pickle is safe here because both ends are processes of this service talking over a Unix socket in a
directory only the service's user can open (app/supervisor.py); nothing from a client is ever unpickled: client
bytes reach the engine only as numbers in shared memory.

    ("call", id, verb, args)     worker -> engine, answered by ("ok", id, value) or ("err", id, exception)
    ("tell", 0, verb, args)      worker -> engine, no answer (close a call, count a metric)
    ("state", 0, snapshot)       engine -> worker whenever what the front ends see changed
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">I")
MAX_MESSAGE = 64 << 20  # the biggest is a state snapshot with every manifest's labels (~30 kB per model)


class LinkClosed(ConnectionError):
    """The other end went away."""


def encode(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def safe_exception(exc: BaseException) -> BaseException:
    """The exception as it can cross the link: our own errors as they are, anything else as its text only
    (a foreign exception may not pickle, and its attributes are internals)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - whatever failed to pickle
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class Link(asyncio.Protocol):
    """One end of a link, as a bare asyncio protocol (no StreamReader: a message costs no future and no
    task to read). Complete messages go to `on_message` as they arrive; messages sent in one event-loop
    turn leave in one write() system call, so under load many requests share each one."""

    def __init__(self, on_message: Callable[[tuple], None], on_lost: Callable[[BaseException | None], None]) -> None:
        self.on_message, self.on_lost = on_message, on_lost
        self.transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._outbox: list[bytes] = []
        self.closed = False

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._inbox
        buf += data
        start, end = 0, len(buf)
        while end - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, start)
            if size > MAX_MESSAGE:
                self._fail(LinkClosed(f"a {size}-byte message is over the link's limit"))
                return
            if end - start - HEADER.size < size:
                break
            body = bytes(buf[start + HEADER.size:start + HEADER.size + size])
            start += HEADER.size + size
            try:
                message = pickle.loads(body)
            except Exception as exc:  # noqa: BLE001 - a garbled message ends the link, not the process
                self._fail(LinkClosed(f"an unreadable message: {exc}"))
                return
            self.on_message(message)
            if self.closed:
                return
        del buf[:start]

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed:
            self.closed = True
            self.on_lost(exc)

    # --- sending -------------------------------------------------------------------------
    def put(self, message: tuple[Any, ...]) -> None:
        if self.closed:
            raise LinkClosed("the link is closed")
        data = encode(message)  # first: a message that cannot be encoded leaves nothing behind
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(data)

    def _flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, as a killed process would."""
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        self.abort()
        self.connection_lost(exc)
