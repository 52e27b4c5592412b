"""Hostile and odd input: one campaign over a real `effnet serve` process.

Every case of the issue's list (and a few more) goes through the real server, over a socket,
to a real EfficientNet (the `tiny` fixture model). Odd-but-valid images must be answered 200;
everything else 4xx with the one JSON error shape and nothing internal in it. Never a 5xx,
and afterwards the process is still up and still classifies a real photo.

The image generators are the serving tests' own (tests/serving/test_serve_preprocess.py);
this file adds the request-level cases and runs all of it against a separate process, so
"the process survives" means something (a crash in a decoder would take it down).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from reliability_helpers import (
    JPEG,
    ServerProcess,
    check_classify_ok,
    check_error,
    encode,
    leaks,
    raw_request,
    read_response,
    real_photo,
    record,
)
from test_serve_preprocess import ODD, REFUSED, _real_png_bomb

LIMIT_MB = 2
LIMIT = LIMIT_MB * 1024 * 1024
Answer = tuple[int, dict, bytes]


@pytest.fixture(scope="module")
def srv(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {
        "EFFNET_REPOSITORY": str(tiny_repo), "EFFNET_MODELS": "tiny,tiny2", "EFFNET_DEFAULT_MODEL": "tiny",
        "EFFNET_MAX_BODY_MB": str(LIMIT_MB),
    }
    server = ServerProcess(env, tmp_path_factory.mktemp("inputs") / "server.log").start()
    yield server
    server.stop()


def _post(srv: ServerProcess, content: bytes | None = None, *, ctype: str | None = "image/jpeg", params=None, **kw) -> Answer:
    headers = {"content-type": ctype} if ctype else {}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        req = c.build_request("POST", "/classify", params=params or {"top_k": 3}, content=content, headers=headers, **kw)
        if ctype is None:
            req.headers.pop("content-type", None)
        r = c.send(req)
    return r.status_code, dict(r.headers), r.content


def _multipart(srv: ServerProcess, **kw) -> Answer:
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/classify", params={"top_k": 3}, **kw)
    return r.status_code, dict(r.headers), r.content


def _over_limit_declared(srv: ServerProcess) -> Answer:
    """Content-Length says 4x the limit; we send 64 KiB of it and wait. The 413 must come
    back while 99% of the body is still unsent: the server refused without reading it."""
    declared = 4 * LIMIT
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {declared}\r\n\r\n")
    status, headers, body = raw_request(srv.port, head, b"\xff" * 65536, timeout=20)
    headers["x-test-sent"] = str(65536)
    return status, headers, body


def _over_limit_chunked(srv: ServerProcess) -> Answer:
    """No Content-Length (chunked): the server counts while it streams and refuses just past
    the limit; we stop sending once the limit plus 256 KiB is out, of the 64 MiB we meant to."""
    import socket

    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"\xff" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(head)
        try:
            while sent <= LIMIT + 256 * 1024:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while we were still sending: what we want
        status, headers, body = read_response(s, 20)
    headers["x-test-sent"] = str(sent)
    return status, headers, body


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return encode(real_photo((200, 133)), "JPEG", exif=exif, quality=90)


def _many_parts() -> dict:
    return {"files": [("file", (f"{i}.png", b"x", "image/png")) for i in range(65)]}


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[ServerProcess], Answer]
    status: int | tuple[int, ...]
    code: str | None = None  # the error code expected (None for 200)
    # False where uvicorn itself may answer an HTTP framing error before the app sees a
    # request (plain text, not our JSON): still 4xx and still nothing internal in it.
    json: bool = True

    @property
    def statuses(self) -> tuple[int, ...]:
        return self.status if isinstance(self.status, tuple) else (self.status,)


def _image_case(name: str, data: bytes, ctype: str = "image/jpeg") -> Case:
    return Case(name, lambda s: _post(s, data, ctype=ctype), 200)


PHOTO = encode(real_photo(), "JPEG", quality=90)

ACCEPTED = [
    _image_case("real_photo_jpeg", PHOTO),
    *(_image_case(name, data, "application/octet-stream") for name, data in sorted(ODD.items())),
    _image_case("exif_rotated_jpeg", _exif_rotated()),
    Case("real_photo_multipart", lambda s: _multipart(s, files={"file": ("cat.jpg", PHOTO, "image/jpeg")}), 200),
]

IMAGE_REFUSED = [
    *(Case(name, (lambda d: lambda s: _post(s, d))(data), 400, "invalid_image") for name, data in sorted(REFUSED.items())),
    Case("png_bomb_40000x40000_real", lambda s: _post(s, _real_png_bomb(), ctype="image/png"), 400, "invalid_image"),
]

REQUEST_REFUSED = [
    Case("body_over_limit_declared", _over_limit_declared, 413, "payload_too_large"),
    Case("body_over_limit_chunked", _over_limit_chunked, 413, "payload_too_large"),
    Case("model_unknown", lambda s: _post(s, PHOTO, params={"model": "nope"}), 404, "unknown_model"),
    Case("model_path_like", lambda s: _post(s, PHOTO, params={"model": "../../etc/passwd"}), 404, "unknown_model"),
    Case("model_absolute_path", lambda s: _post(s, PHOTO, params={"model": "/etc/passwd"}), 404, "unknown_model"),
    Case("model_very_long", lambda s: _post(s, PHOTO, params={"model": "b" * 8000}), 404, "unknown_model"),
    Case("model_unicode", lambda s: _post(s, PHOTO, params={"model": "ëfficiënt-模型-🐈"}), 404, "unknown_model"),
    Case("model_nul_byte", lambda s: _post(s, PHOTO, params={"model": "tiny\x00"}), 404, "unknown_model"),
    Case("models_path_traversal", lambda s: raw_request(
        s.port, "GET /models/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 404),
    Case("top_k_0", lambda s: _post(s, PHOTO, params={"top_k": 0}), 422, "validation_error"),
    Case("top_k_negative", lambda s: _post(s, PHOTO, params={"top_k": -5}), 422, "validation_error"),
    Case("top_k_huge", lambda s: _post(s, PHOTO, params={"top_k": 10**30}), 422, "validation_error"),
    Case("top_k_1001", lambda s: _post(s, PHOTO, params={"top_k": 1001}), 422, "validation_error"),
    Case("top_k_not_a_number", lambda s: _post(s, PHOTO, params={"top_k": "five"}), 422, "validation_error"),
    Case("multipart_without_file", lambda s: _multipart(s, files={"image": ("a.jpg", PHOTO, "image/jpeg")}), 400, "bad_request"),
    Case("multipart_only_text_fields", lambda s: _multipart(s, data={"note": "hi"}, files={"x": (None, b"")}), 400, "bad_request"),
    Case("multipart_empty_file", lambda s: _multipart(s, files={"file": ("a.jpg", b"", "image/jpeg")}), 400, "invalid_image"),
    Case("multipart_65_parts", lambda s: _multipart(s, **_many_parts()), 400, "bad_request"),
    Case("multipart_no_boundary", lambda s: _post(s, b"--x\r\n\r\n", ctype="multipart/form-data"), 400, "bad_request"),
    Case("multipart_garbage", lambda s: _post(s, b"garbage", ctype="multipart/form-data; boundary=zz"), 400, "bad_request"),
    Case("content_type_text", lambda s: _post(s, PHOTO, ctype="text/plain"), 415, "unsupported_media_type"),
    Case("content_type_json", lambda s: _post(s, b'{"image": "x"}', ctype="application/json"), 415, "unsupported_media_type"),
    Case("content_type_form", lambda s: _post(s, b"a=b", ctype="application/x-www-form-urlencoded"), 415, "unsupported_media_type"),
    Case("content_type_missing", lambda s: _post(s, PHOTO, ctype=None), 415, "unsupported_media_type"),
    Case("content_length_not_a_number", lambda s: raw_request(
        s.port, "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: abc\r\n"
        "Connection: close\r\n\r\n"), 400, json=False),
    Case("request_line_100k", lambda s: raw_request(
        s.port, f"POST /classify?model={'a' * 100_000} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"), 431, "request_header_too_large"),  # over EFFNET_MAX_HEADER_KB
    Case("get_on_classify", lambda s: (lambda r: (r.status_code, dict(r.headers), r.content))(
        httpx.get(s.url + "/classify", timeout=30)), 405, "method_not_allowed"),
]

CASES = ACCEPTED + IMAGE_REFUSED + REQUEST_REFUSED


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_input_gets_a_clear_answer_and_never_a_5xx(srv: ServerProcess, case: Case):
    status, headers, body = case.send(srv)
    code = None
    try:
        assert status < 500, f"{case.name}: {status} {body[:300]!r}"
        assert status in case.statuses, f"{case.name}: {status} {body[:300]!r}"
        if status == 200:
            check_classify_ok(httpx.Response(200, content=body).json(), 3)
        elif not case.json and not headers.get("content-type", "").startswith("application/json"):
            assert not leaks(body.decode("latin-1")), body[:300]
        else:
            code = check_error(status, headers, body)["code"]
            if case.code is not None:
                assert code == case.code, (case.name, code)
        if status == 413:
            # Refused early: the answer came while most of the body was never sent.
            assert int(headers["x-test-sent"]) < LIMIT + 512 * 1024
            assert headers.get("connection") == "close"
            record("security", check=f"upload bounded before buffering ({case.name})",
                   outcome=f"413 + Connection: close after {int(headers['x-test-sent']) // 1024} KiB sent "
                   f"of a {'4x-limit declared' if 'declared' in case.name else '64 MiB chunked'} upload (limit {LIMIT_MB} MiB)")
        ok = True
    except AssertionError:
        ok = False
        raise
    finally:
        record("inputs", case=case.name, expected="/".join(map(str, case.statuses)), status=status, code=code, ok=ok,
               group="accepted" if case in ACCEPTED else "image" if case in IMAGE_REFUSED else "request")


def test_the_process_survived_and_still_serves(srv: ServerProcess):
    assert srv.alive(), srv.log()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/health/ready").status_code == 200
        for model in ("tiny", "tiny2"):
            r = c.post("/classify", params={"model": model}, content=PHOTO, headers=JPEG)
            assert r.status_code == 200 and r.json()["model"] == model
        text = c.get("/metrics").text
    assert 'status="500"' not in text  # no request anywhere in the campaign ended in a 500
    log = srv.log()
    assert "Traceback" not in log and "unhandled error" not in log, log
