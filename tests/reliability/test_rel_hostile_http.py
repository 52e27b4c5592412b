"""Hostile clients at the HTTP front door (issue 21, slice A), each against a running server.

* Request heads: a head past EFFNET_MAX_HEADER_KB gets 431 and the connection closes (an endless one is cut
  off, endless chunked trailers too); one that trickles gets 408 after EFFNET_HEADER_TIMEOUT_S, a silent
  socket is closed, an idle keep-alive one too after EFFNET_KEEPALIVE_S, and one that goes on sending a
  body nobody reads after the head's time. Sockets between requests (opening, sending headers, idle) do
  not count against EFFNET_MAX_CONNECTIONS: a crowd of them leaves the liveness probe answered, and they
  are bounded apart (the longest waiting closed first).
* /v2/repository/* bodies go through the bounded body reader: 413 past the limit (declared or streamed),
  408 for a stalled one, in every control mode and before the 403 of load/unload.
* The access log: a request id or a path cannot forge fields or lines.
* Libraries' logs: bytes that are not HTTP and malformed multipart bodies, sent again and again, leave a few
  lines per process, not one per request (app/core/log_limits.py).
* TLS: with EFFNET_TLS_CERT/KEY the HTTP port speaks HTTPS only.

The head tests run the real `effnet serve` (app/api/server.py's uvicorn config), with EFFNET_WORKERS set
from EFFNET_TEST_WORKERS so that both serve() and serve_worker() are covered.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prerequisites import require_tool
from raw_http import HeldUpload, close_all, until
from reliability_helpers import ServerProcess, check_error, read_response, record, server_process
from serving_helpers import TEST_WORKERS, make_live_server

from effnet_serve.core.config import Settings
from effnet_serve.core.log_limits import BURST

GENERATED = re.compile(r"^[0-9a-f]{32}$")
LIVE = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
PARTIAL_HEAD = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: "


def _env(tiny_repo: Path, **extra: str) -> dict[str, str]:
    return {"EFFNET_REPOSITORY": str(tiny_repo), "EFFNET_MODELS": "tiny", "EFFNET_DEFAULT_MODEL": "tiny",
            "EFFNET_WORKERS": str(TEST_WORKERS), **extra}


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed this socket (looked at, not waited for); unread data is read past."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536):
                return True
    except OSError:  # reset
        return True
    return False


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _closed(sock):
            return True
        time.sleep(0.05)
    return False


# --- request heads ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crowded(tiny_repo: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server with room for 16 requests in progress, and long head and keep-alive timeouts (so what the
    tests see is the count, not a timeout)."""
    env = _env(tiny_repo, EFFNET_MAX_CONNECTIONS="16", EFFNET_HEADER_TIMEOUT_S="120", EFFNET_KEEPALIVE_S="120")
    with server_process(env, tmp_path_factory.mktemp("crowded") / "server.log") as srv:
        yield srv


def test_an_oversized_head_gets_431_and_an_endless_one_is_cut_off(crowded):
    with _connect(crowded.port) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)  # never ends
        status, headers, body = read_response(s, 30)
        assert status == 431 and headers.get("connection") == "close"
        assert check_error(status, headers, body)["code"] == "request_header_too_large"
        assert _closed_within(s, 30)
    # 32 MB of one header that never ends: the server stops reading and closes long before the end.
    sent = 0
    with _connect(crowded.port) as s, pytest.raises(OSError):
        while sent < 32 << 20:
            s.sendall(b"b" * 65536 if sent else b"GET / HTTP/1.1\r\nX-Big: ")
            sent += 65536
    record("hostile", endless_head_cut_off_after_mb=round(sent / 2**20, 1))
    assert httpx.get(crowded.url + "/health/live", timeout=30).status_code == 200


def test_endless_chunked_trailers_are_cut_off(crowded):
    # The body is over (its last, empty chunk), then one trailer field that never ends: httptools would keep
    # it whole, and the answer to /health/live went out long ago.
    sent = 0
    with _connect(crowded.port) as s, pytest.raises(OSError):
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: ")
        while sent < 32 << 20:
            s.sendall(b"t" * 65536)
            sent += 65536
    record("hostile", endless_trailer_cut_off_after_mb=round(sent / 2**20, 1))


def test_sockets_between_requests_neither_starve_the_probe_nor_pile_up(crowded):
    heading, idle = [], []
    try:
        for _ in range(24):  # still sending their headers
            s = _connect(crowded.port)
            s.sendall(PARTIAL_HEAD)
            heading.append(s)
        for _ in range(24):  # one request answered, then idle on keep-alive
            s = _connect(crowded.port)
            s.sendall(LIVE)
            assert read_response(s, 30)[0] == 200
            idle.append(s)
        # 48 open sockets, three times EFFNET_MAX_CONNECTIONS: none of them has a request in progress.
        probes = [httpx.get(crowded.url + "/health/live", timeout=30).status_code for _ in range(5)]
        assert probes == [200] * 5
        # Between requests, at most EFFNET_MAX_CONNECTIONS a process are kept: the longest waiting went first.
        room = 16 * TEST_WORKERS
        until(lambda: sum(_closed(s) for s in heading + idle) >= 48 - room, 30, "the oldest waiting sockets closed")
        assert not any(_closed(s) for s in idle[-3:])  # the newest stay
    finally:
        for s in heading + idle:
            s.close()


@pytest.fixture(scope="module")
def impatient(tiny_repo: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    env = _env(tiny_repo, EFFNET_HEADER_TIMEOUT_S="2", EFFNET_KEEPALIVE_S="2")
    with server_process(env, tmp_path_factory.mktemp("impatient") / "server.log") as srv:
        yield srv


def test_slow_silent_and_idle_sockets_are_timed_out(impatient):
    bound = 30.0  # "timed out at all", whatever the machine's speed: the timeouts are 2 s
    with _connect(impatient.port) as trickling, _connect(impatient.port) as silent, _connect(impatient.port) as idle:
        idle.sendall(LIVE)
        assert read_response(idle, 30)[0] == 200
        trickling.sendall(b"GET /health/live HTTP/1.1\r\n")
        deadline = time.monotonic() + bound
        while not select.select([trickling], [], [], 0.5)[0]:  # a header byte every half second
            assert time.monotonic() < deadline, "a trickling head was never timed out"
            trickling.sendall(b"x")
        status, headers, body = read_response(trickling, 30)
        assert status == 408 and headers.get("connection") == "close"
        assert check_error(status, headers, body)["code"] == "request_timeout"
        assert _closed_within(silent, bound), "a socket that never sent a byte was kept"
        assert _closed_within(idle, bound), "an idle keep-alive socket was kept"


def test_a_body_nobody_reads_is_not_taken_for_ever(impatient):
    """/health/live answers without reading the body; a client that goes on sending it, a chunk at a time,
    is closed on after the head's time rather than read from for ever."""
    with _connect(impatient.port) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
        assert read_response(s, 30)[0] == 200
        deadline = time.monotonic() + 30
        try:
            while not _closed(s):
                assert time.monotonic() < deadline, "a body nobody reads was taken for ever"
                s.sendall(b"1\r\nx\r\n")
                time.sleep(0.25)
        except OSError:  # reset while sending: closed too
            pass
    with _connect(impatient.port) as s:  # the same body, ended after the answer: then idle, and timed out so
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
        assert read_response(s, 30)[0] == 200
        s.sendall(b"0\r\n\r\n")
        assert _closed_within(s, 30), "idle after a body nobody read, and kept"


# --- /v2/repository bodies, the access log ----------------------------------------------------
@pytest.fixture(scope="module")
def small_bodies(tiny_repo: Path):
    settings = Settings(repository=tiny_repo, models=["tiny"], default_model="tiny", threads=1, grpc_port=0,
                        max_body_mb=1, body_timeout_s=3)
    srv = make_live_server(settings).start()
    try:
        yield srv
    finally:
        srv.stop()
        close_all()


def _v2_error(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


@pytest.mark.parametrize("path", ["/v2/repository/index", "/v2/repository/models/tiny/load"])
def test_repository_bodies_are_read_within_bounds(small_bodies, path):
    url = small_bodies.url + path
    big = b" " * (4 << 20)  # four times EFFNET_MAX_BODY_MB, declared
    r = httpx.post(url, content=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.headers.get("connection") == "close", r.text
    _v2_error(r)

    def streamed():  # the same, chunked: known to be too big only as it arrives
        for _ in range(64):
            yield b" " * 65536

    r = httpx.post(url, content=streamed(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    r = httpx.post(url, content=b" " * (100 << 10), timeout=60)  # under the body limit, far over this API's
    assert r.status_code == 413, r.text
    assert _v2_error(r) == "body is 102400 bytes; the limit is 65536"  # by its length, before it was read
    # Stalled: 408 within the body timeout, before the control mode's 403 (load) or the index.
    held = HeldUpload(small_bodies.port, path, b"{}" + b" " * 998, 10, content_type="application/json")
    status, headers, body = held.answer(timeout=30)
    assert status == 408 and headers.get("connection") == "close", body
    until(lambda: small_bodies.plane.memory.used == 0, 30, "every body's bytes given back")
    # What the routes are for still works.
    assert httpx.post(small_bodies.url + "/v2/repository/index", json={"ready": True}, timeout=30).status_code == 200
    assert httpx.post(small_bodies.url + "/v2/repository/models/tiny/load", timeout=30).status_code == 403


def test_the_access_log_cannot_be_forged(small_bodies, caplog):
    caplog.set_level(logging.INFO, logger="effnet.access")
    r = httpx.get(small_bodies.url + "/health/live", headers={"X-Request-Id": "abc status=200 model=b7"}, timeout=30)
    assert r.status_code == 200 and GENERATED.match(r.headers["x-request-id"])  # replaced, not echoed
    rid = r.headers["x-request-id"]
    r = httpx.get(small_bodies.url + "/status=500%20model=b7", headers={"X-Request-Id": "path-1"}, timeout=30)
    assert r.status_code == 404 and r.headers["x-request-id"] == "path-1"

    def ours() -> list[str]:  # the server logs from its own thread: polled
        return [m for m in caplog.messages if m.endswith((f"id={rid}", "id=path-1"))]

    until(lambda: len(ours()) == 2, 30, "both access lines")
    lines = ours()
    for line in lines:  # one `status=` and one `model=` each, the server's own
        assert line.count("status=") == 1 and line.count("model=") == 1 and "\n" not in line, line
    assert any(line.startswith("GET /status%3D500%20model%3Db7 model=- status=404 ") for line in lines), lines



NOT_HTTP = b"NOT HTTP\x00\r\n\r\n"
BAD_MULTIPART = b"--x\r\nGarbage\r\n\r\n"  # python-multipart: "Found invalid character 13 in header at 12"


def test_a_client_cannot_write_a_log_line_per_bad_request(tiny_repo, tmp_path):
    log_path = tmp_path / "server.log"
    with server_process(_env(tiny_repo), log_path) as srv:
        for _ in range(40):  # uvicorn logs each one ("Invalid HTTP request received.") and closes it
            with _connect(srv.port) as sock:
                sock.sendall(NOT_HTTP)
                assert _closed_within(sock, 30)
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            for _ in range(40):
                r = client.post("/classify", content=BAD_MULTIPART,
                                headers={"content-type": "multipart/form-data; boundary=x"})
                assert r.status_code == 400, r.text
                assert check_error(r.status_code, r.headers, r.content)["message"] == "malformed multipart body"
            assert client.get("/health/live").status_code == 200
    log = log_path.read_text(errors="replace")
    processes = max(1, TEST_WORKERS)  # each process keeps its own count
    for line in ("Invalid HTTP request received", "Found invalid character"):
        # The operator still sees that it happens: the first lines are kept.
        assert 1 <= log.count(line) <= BURST * processes, (line, log.count(line), log[-3000:])


# --- TLS --------------------------------------------------------------------------------------
def test_tls_serves_https_and_refuses_plaintext(tiny_repo, tmp_path, monkeypatch):
    openssl = require_tool("openssl", "apt-get install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the start-up poll's httpx trusts the test's own CA
    srv = ServerProcess(_env(tiny_repo, EFFNET_TLS_CERT=str(cert), EFFNET_TLS_KEY=str(key)), tmp_path / "server.log")
    srv.url = f"https://127.0.0.1:{srv.port}"
    srv.start(timeout=90)
    try:
        ca = ssl.create_default_context(cafile=str(cert))
        r = httpx.get(srv.url + "/health/live", verify=ca, timeout=30)
        assert r.status_code == 200 and r.url.scheme == "https"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{srv.port}/health/live", timeout=30)
        assert httpx.get(srv.url + "/health/live", verify=ca, timeout=30).status_code == 200  # still serving
    finally:
        assert srv.stop() == 0
