"""Shared by the reliability campaigns: a real `effnet serve` process, raw-socket requests,
the leak check every error answer goes through, and the run's report.

Every campaign records what it tried into REPORT; conftest.py writes it as JSON to
$EFFNET_RELIABILITY_REPORT at the end of the session and write_report.py renders
docs/reliability.md from that file, so the documented counts are always a real run's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
JPEG = {"content-type": "image/jpeg"}

# --- the report ----------------------------------------------------------------------------
REPORT: dict[str, Any] = {
    "inputs": [],  # one entry per hostile/odd input: case, expected, status, code, ok
    "fuzz": {},  # schemathesis and hypothesis campaign counts
    "overload": {},  # bursts, accepted/refused, p99 vs bound, RSS per burst
    "faults": [],  # one entry per injected fault
    "shutdown": {},
    "security": [],  # one entry per security property checked
    "hostile": {},  # slow, impatient and malicious clients (test_rel_hostile*.py)
}


def record(section: str, **entry: Any) -> None:
    target = REPORT[section]
    if isinstance(target, list):
        target.append(entry)
    else:
        target.update(entry)


def write_report_json(path: str, exitstatus: int) -> None:
    data = {**REPORT, "run": {"exitstatus": int(exitstatus), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "python": sys.version.split()[0], "cores": os.cpu_count()}}
    Path(path).write_text(json.dumps(data, indent=2, default=str))


# --- images from a real photo -----------------------------------------------------------------
def real_photo(size: tuple[int, int] | None = None) -> Image.Image:
    """scikit-image's `chelsea` (a real 451x300 photo of a cat), optionally resized."""
    from skimage import data as skdata

    img = Image.fromarray(skdata.chelsea())
    return img.resize(size, Image.Resampling.BICUBIC) if size else img


def encode(img: Image.Image, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(value: int, size: int = 64) -> bytes:
    return encode(Image.fromarray(np.full((size, size, 3), value, np.uint8)), "PNG")


# --- answers --------------------------------------------------------------------------------
# What an error body must never contain: stack traces, source paths, Python or ORT exception
# class names. Case-sensitive on purpose: our messages say "decompression bomb guard", which
# is a fine thing to tell a client; "DecompressionBombError" is an internal.
LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|site-packages|/work/|/tmp/|/usr/|/home/|"
    r"\b[A-Z][A-Za-z]*(?:Error|Exception|Warning)\b|\bInvalidProtobuf\b|pybind11|onnxruntime_pybind|"
    r"struct\.error|\bat 0x[0-9a-f]+"
)


def leaks(text: str) -> list[str]:
    return LEAKS.findall(text)


def check_error(status: int, headers: Any, body: bytes) -> dict:
    """The one JSON error shape, with nothing internal in it; returns the `error` object."""
    ctype = headers.get("content-type", "")
    ctype = ctype[0] if isinstance(ctype, list) else ctype  # schemathesis keeps every header as a list
    assert ctype.startswith("application/json"), (status, ctype, body[:200])
    data = json.loads(body)
    assert set(data) == {"error"}, data
    err = data["error"]
    assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str), data
    found = leaks(body.decode("utf-8", "replace"))
    assert not found, f"error answer leaks internals: {found}: {body[:300]!r}"
    return err


def check_classify_ok(body: dict, top_k: int) -> None:
    assert set(body) == {"model", "pretrained", "results"} and len(body["results"]) == 1, body
    assert set(body["results"][0]) == {"model", "provider", "predictions", "timing_ms"}, body
    preds = body["results"][0]["predictions"]
    assert len(preds) == top_k and all(0.0 <= p["score"] <= 1.0 for p in preds)
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True)


# --- raw HTTP over a socket -------------------------------------------------------------------
def read_response(sock: socket.socket, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length bodies only, which is all this service sends)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {buf[:200]!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + body)
        return read_response(s, timeout)


# --- a real server process --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class ServerProcess:
    """`python -m effnet_serve serve` on a free port, configured by EFFNET_* variables, log to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")},
            # the checkout beside these tests (tests/conftest.py put its import names first), then the tests' own
            "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p),
            "EFFNET_THREADS": "1",
            "EFFNET_DECODE_WORKERS": "1",
            "EFFNET_GRPC_PORT": "0",  # no fixed gRPC port on a shared test machine
            **env,
        }
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "effnet_serve", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.log()}"
            try:
                key = self.env.get("EFFNET_API_KEY")
                models = httpx.get(self.url + "/models", timeout=2,
                                   headers={"X-API-Key": key} if key else None).json()["models"]
                if all(m["status"] != "loading" for m in models):
                    return self
            except (httpx.TransportError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, "server never finished loading: " + self.log()
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""


@contextlib.contextmanager
def server_process(env: dict[str, str], log_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(env, log_path).start()
    try:
        yield srv
    finally:
        srv.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())  # in the metric's label order
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


# --- load generators (also used by benchmarks/reliability.py, which times the same scenarios) -------------
def request_bytes(path: str, body: bytes, content_type: str = "image/jpeg") -> bytes:
    """One whole keep-alive HTTP/1.1 POST, built once: the load generators resend the same bytes."""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode("latin-1") + body)


async def exchange(reader, writer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a raw asyncio connection. The load generators share the cores with the server, so they
    must cost far less per request than it does: prebuilt bytes, no HTTP client library."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


@dataclasses.dataclass
class Answer:
    """One request of a closed loop: when it was sent and answered (perf_counter), and what came back.
    `error` is set (and status 0) when the connection failed instead: a request lost."""

    t0: float
    t1: float
    status: int
    headers: dict[str, str]
    body: bytes
    error: str = ""


async def closed_loop(port: int, request: bytes, clients: int, answers: list[Answer], done: Callable[[], bool],
                      refused_pause_s: float = 0.0) -> None:
    """`clients` keep-alive connections, each resending `request` as soon as it has an answer (after
    `refused_pause_s` when the answer was a refusal) until `done()`; every answer goes into `answers`, a 200's
    body excepted. A connection that fails is recorded as an Answer with `error` and opened again."""

    async def client() -> None:
        reader = writer = None
        try:
            while not done():
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                t0 = time.perf_counter()
                try:
                    status, headers, body = await exchange(reader, writer, request)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    answers.append(Answer(t0, time.perf_counter(), 0, {}, b"", f"{type(exc).__name__}: {exc}"))
                    writer.close()
                    writer = None
                    continue
                answers.append(Answer(t0, time.perf_counter(), status, headers, b"" if status == 200 else body))
                if headers.get("connection") == "close":
                    writer.close()
                    writer = None
                if status != 200 and refused_pause_s:
                    await asyncio.sleep(refused_pause_s)
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))


# A /health/live prober in a process of its own (python -c LIVE_PROBE URL COUNT TIMEOUT_S [PAUSE_S]), so it
# times the server and not the GIL of whoever runs it. Prints [[status, seconds], ...]; status 0 = no answer
# within TIMEOUT_S.
LIVE_PROBE = """
import json, sys, time
import httpx
url, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
probes = []
with httpx.Client(base_url=url, timeout=timeout) as c:
    for _ in range(count):
        t0 = time.perf_counter()
        try:
            status = c.get("/health/live").status_code
        except httpx.TransportError:
            status = 0
        probes.append([status, time.perf_counter() - t0])
        time.sleep(pause)
print(json.dumps(probes))
"""
