"""Messages between a worker and the engine: a 4-byte big-endian length, then a pickled tuple.

Pickle is safe here because both ends are processes of this service talking over a Unix socket in a
directory only the service's user can open (app/serve.py); nothing from a client is ever unpickled: client
bytes reach the engine only as numbers in shared memory.

    ("call", id, verb, args)     worker -> engine, answered by ("ok", id, value) or ("err", id, exception)
    ("tell", 0, verb, args)      worker -> engine, no answer (close a call, count a metric)
    ("state", 0, snapshot)       engine -> worker whenever what the front ends see changed
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

HEADER = struct.Struct(">I")
MAX_MESSAGE = 64 << 20  # the biggest is a state snapshot with every manifest's labels (~30 kB per model)


class LinkClosed(ConnectionError):
    """The other end went away."""


async def read_message(reader: asyncio.StreamReader) -> tuple:
    try:
        head = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(head)
        if size > MAX_MESSAGE:
            raise LinkClosed(f"a {size}-byte message is over the link's limit")
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise LinkClosed(str(exc) or "the other end closed the link") from None


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
