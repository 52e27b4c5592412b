"""Raw HTTP/1.1 over a socket, for what an HTTP client library will not do on purpose: send half a body and
hold it there, finish it later, or leave in the middle of a request. Shared by the upload-limit, memory-budget
and reload tests (tests/conftest.py puts this folder on the path)."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable

import numpy as np
from PIL import Image
from reliability_helpers import read_response  # noqa: F401 - re-exported: one raw-answer reader for every folder
from serving_helpers import encode, photo


# Every socket opened here, so a test that fails half-way still closes them (`close_all`, at teardown).
OPEN: list[socket.socket] = []


def close_all() -> None:
    while OPEN:
        OPEN.pop().close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    OPEN.append(sock)
    return sock


class HeldUpload:
    """A POST whose headers announce the whole body (Content-Length) while only `sent` bytes of it go out.
    The server sees a client still uploading until `finish` sends the rest or `leave` closes the socket."""

    def __init__(self, port: int, path: str, body: bytes, sent: int, content_type: str = "image/png",
                 headers: dict[str, str] | None = None) -> None:
        assert 0 < sent < len(body)
        self.body, self.sent = body, sent
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n")
        self.sock = _connect(port)
        self.sock.sendall(head.encode("latin-1") + body[:sent])

    def finish(self, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        """Send the rest of the body and read the answer."""
        try:
            self.sock.sendall(self.body[self.sent:])
            return read_response(self.sock, timeout)
        finally:
            self.sock.close()

    def answer(self, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        """Read the answer the server gives without the rest of the body (a 408, say)."""
        try:
            return read_response(self.sock, timeout)
        finally:
            self.sock.close()

    def leave(self) -> None:
        """The client goes away mid-request."""
        self.sock.close()


class ChunkedUpload:
    """A POST with no Content-Length (Transfer-Encoding: chunked), sent a chunk at a time at the caller's pace:
    the server learns the body's size only as the bytes arrive."""

    def __init__(self, port: int, path: str, content_type: str = "image/png") -> None:
        self.sock = _connect(port)
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                          f"Transfer-Encoding: chunked\r\n\r\n".encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def end(self) -> None:
        """The last (empty) chunk: the body is complete."""
        self.sock.sendall(b"0\r\n\r\n")

    def heard_back(self) -> bool:
        """Whether the server has already answered, closed or reset the connection (looked at, not waited for)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)


def full_request(port: int, path: str, body: bytes, content_type: str = "image/png") -> socket.socket:
    """Send a whole request and return the open socket without reading the answer (the caller may leave)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    sock = _connect(port)
    sock.sendall(head.encode("latin-1") + body)
    return sock


def until(check: Callable[[], bool], seconds: float = 60.0, what: str = "") -> None:
    """Poll `check` until it holds; fail after a deadline generous enough for a busy 2-core machine."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


def error_of(status: int, headers: dict[str, str], body: bytes) -> dict:
    """The JSON API's error object, checking its shape."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
    data = json.loads(body)
    assert set(data) == {"error"} and isinstance(data["error"]["message"], str), data
    return data["error"]


def png(size: tuple[int, int] = (73, 73), seed: int = 0) -> bytes:
    """A small photo-like PNG (lossless, so the test knows its exact pixels)."""
    return encode(photo(size, seed=seed), "PNG")


def flat_png(size: int) -> bytes:
    """A PNG that compresses to almost nothing but decodes to size x size RGB pixels."""
    return encode(Image.fromarray(np.full((size, size, 3), 128, np.uint8)), "PNG")


def multipart(*images: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with each image as a `file` field, and its content type."""
    boundary = "effnetboundary7"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + img + b"\r\n" for i, img in enumerate(images))
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
