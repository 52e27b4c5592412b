"""Shared by the reliability campaigns: a real `effnet serve` process, raw-socket requests,
the leak check every error answer goes through, and the run's report.

Every campaign records what it tried into REPORT; conftest.py writes it as JSON to
$EFFNET_RELIABILITY_REPORT at the end of the session and write_report.py renders
docs/reliability.md from that file, so the documented counts are always a real run's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
    assert set(body["results"][0]) == {"model", "predictions", "timing_ms"}, body
    preds = body["results"][0]["predictions"]
    assert len(preds) == top_k and all(0.0 <= p["score"] <= 1.0 for p in preds)
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True)


# --- raw HTTP over a socket -------------------------------------------------------------------
def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
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
    """`python -m app serve` on a free port, configured by EFFNET_* variables, log to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")},
            "PYTHONPATH": str(ROOT),
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
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
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
