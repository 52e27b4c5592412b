"""Submit answers sent by the inference thread straight to the worker, over a second one-way channel.

On a quiet service, waking a thread or a process that sat idle through a run costs ~0.12 ms here (its vCPU
leaves its idle state), and a submit's answer used to need two such wake-ups after the run: the engine's
event loop, then the worker's. Besides them, ~0.25 ms of the loop's own work came before the answer left
(the batch's futures, the verb's task, the logits' copy, the message). Now the thread that ran the batch
writes each call's logits into the worker's arena and sends its answer as soon as the call's last image has
run; the engine's loop does its bookkeeping (queue room, metrics, routing samples) afterwards, off the
request's path, and only the worker's wake-up is left on it.

The channel is a SOCK_SEQPACKET Unix socket that the engine connects to the worker's listener during `hello`.
Each message is one datagram: sends from several inference threads never interleave, and a full buffer
refuses a whole message (the loop then answers on the link) rather than part of one.

Exactly one side answers each submit: the inference thread, or the engine's loop (an error, a cancellation,
no channel, a refused send), whichever claims the `Answer` first under its lock. Only the side that claims
writes into the worker's arena, so space the worker freed after the other side's answer is never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..batcher import ImageDone

log = logging.getLogger("effnet.engine")

MAX_DATAGRAM = 64 * 1024  # an answer is ~30 bytes per image; anything bigger goes over the link instead


class Outbox:
    """The engine's end of one worker's channel: non-blocking sends from any thread. A lock keeps `close` (the
    loop, when the worker leaves) from releasing the descriptor while a thread sends on it: the number could
    belong to another file by the time the send runs."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, path: str) -> Outbox | None:
        """None when the worker's listener cannot be reached: its answers then all go over the link."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            log.warning("no direct answer channel to %s (%s): answers go over the link", path, exc)
            return None
        return cls(sock)

    def send(self, message: tuple[Any, ...]) -> bool:
        """True when the whole message left; False (nothing sent) on a full buffer or a closed channel."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_DATAGRAM:
            return False
        with self._lock:
            try:
                self._sock.send(data, socket.MSG_DONTWAIT)
            except OSError:  # a full buffer, a worker gone, or closed here (the socket forgot its descriptor)
                return False
        return True

    def close(self) -> None:
        with self._lock:
            self._sock.close()


class Answer:
    """One submit's answer (module docstring). `outputs` are the views of the worker's arena its images' logits
    go to, in order."""

    def __init__(self, mid: int, outputs: list[np.ndarray], outbox: Outbox) -> None:
        self.mid, self.outputs, self.outbox = mid, outputs, outbox
        self._lock = threading.Lock()
        self._left = len(outputs)
        self._meta: list[tuple[float, float, int] | None] = [None] * len(outputs)
        self._claimed_by: str | None = None  # "thread" or "loop"

    def hooks(self) -> list[ImageDone]:
        """For the batcher: one per image, called in the inference thread once that image has run."""
        return [functools.partial(self._image_done, i) for i in range(len(self.outputs))]

    def _image_done(self, i: int, row: np.ndarray, queue_s: float, inference_s: float, batch: int) -> None:
        out = self.outputs[i]
        with self._lock:
            if self._claimed_by is not None or row.shape != out.shape:  # the loop answers (another shape: as before)
                return
            out[:] = row
            self._meta[i] = (queue_s, inference_s, batch)
            self._left -= 1
            if self._left == 0:
                # Claimed before the send: the worker may answer back (close the call) before this thread runs again.
                self._claimed_by = "thread"
                sent = False
                try:
                    sent = self.outbox.send(("ok", self.mid, self._meta))
                finally:  # refused, or raised (the batcher logs it): the loop answers
                    if not sent:
                        self._claimed_by = None

    def claim(self) -> bool:
        """For the engine's loop: True when it is to answer (the thread has not), and from now on only it."""
        with self._lock:
            if self._claimed_by is not None:
                return False
            self._claimed_by = "loop"
            return True

    @property
    def sent(self) -> bool:
        """The inference thread answered: the call's task has only bookkeeping left, which must not be cut short."""
        with self._lock:  # not while a send is under way
            return self._claimed_by == "thread"


class Inbox:
    """The worker's end: a listener the engine connects to during `hello`, then datagrams read on the loop."""

    def __init__(self, path: str, listener: socket.socket) -> None:
        self.path, self._listener = path, listener
        self._conn: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[tuple], None] | None = None
        self.received = 0

    @classmethod
    def listen(cls, directory: str) -> Inbox | None:
        """A listener in `directory` (the engine socket's own, which only this user can open); None when it
        cannot be made (a path over the 108 bytes a Unix socket may have, say): answers then go over the link."""
        path = os.path.join(directory, f"answers-{os.getpid()}-{os.urandom(4).hex()}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(1)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            log.warning("no direct answer channel (%s): answers go over the link", exc)
            return None
        listener.setblocking(False)
        return cls(path, listener)

    def accept(self, on_message: Callable[[tuple], None]) -> bool:
        """After `hello` was answered (the engine connected before it answered): read answers from now on.
        False when the engine did not connect; the listener is gone either way."""
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return False
        finally:
            self._drop_listener()
        conn.setblocking(False)
        self._conn, self._loop, self._on_message = conn, asyncio.get_running_loop(), on_message
        self._loop.add_reader(conn.fileno(), self._read)
        return True

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                data = self._conn.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the engine is gone: the link reports it
                self._stop_reading()
                return
            try:
                message = pickle.loads(data)
            except Exception:  # noqa: BLE001 - never expected from the engine; the link's answer would be lost
                log.exception("an unreadable answer from the engine")
                continue
            self.received += 1
            assert self._on_message is not None
            self._on_message(message)

    def _stop_reading(self) -> None:
        if self._conn is not None and self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
            self._loop = None

    def _drop_listener(self) -> None:
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        self._stop_reading()
        if self._conn is not None:
            self._conn.close()
        else:
            self._drop_listener()
