"""Hostile bodies whose parsing or decoding costs the server far more than sending them costs the client.

* Multipart (finding 4): 10 MB of `\\r\\n--aX` with boundary `a` made python-multipart step through 1.7 M
  delimiters in Python on the event loop (2-3 s each). Refused from a count of delimiters found in C, and
  parsed in a decode thread: /health/live keeps answering.
* gzip (finding 5): a 3 kB gzip of a 3 MB tensor was charged 3 kB. The decompressed bytes are charged like a
  plain body's, and given back when the request ends.
* The JSON worker (finding 6): callers waited on it from the decode threads /classify and gRPC share, with no
  timeout. Now the loop awaits it (no thread waits), a bounded number at once, each for a bounded time: with
  the worker stopped, /classify still answers and the big JSON bodies get 503 + Retry-After. `data` of a
  million empty lists is refused by count, a JSON header nested 900 deep is not a 500, and an output can be
  asked for only once.
* Decoding (finding 8): small flat PNGs that declare megapixels are bounded per request
  (EFFNET_MAX_REQUEST_PIXELS, 413), not only per image.

Waits are polls with generous deadlines; where a request must be caught mid-way the test holds the server's
own resource (the JSON worker process, stopped with SIGSTOP), so timing is the test's, not the machine's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import os
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from raw_http import error_of, flat_png, multipart, png, until
from reliability_helpers import encode, real_photo
from serving_helpers import live_server, write_model

from effnet_serve.api.uploads import MAX_PARTS, parse_multipart
from effnet_serve.api.v2.codec import decode_content, parse_infer
from effnet_serve.core.errors import ApiError
from effnet_serve.api.v2.json_worker import IN_PROCESS_BYTES, JsonWorker
from effnet_serve.core.config import Settings
from effnet_serve.core.errors import (
    BadRequest,
    OverBudget,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
)
from effnet_serve.engine.manifest import load_manifest
from effnet_serve.engine.memory import MemoryBudget
from effnet_serve.engine.preprocess import PixelAllowance, prepare

CROP = 64  # the tiny model's input: [N, 3, 64, 64]
INFER = "/v2/models/tiny/infer"


def settings(repo: Path, **overrides) -> Settings:
    options = {"repository": repo, "models": ["tiny"], "default_model": "tiny", "threads": 1, "decode_workers": 1,
               "device": "cpu", "grpc_port": 0}
    options.update(overrides)
    return Settings(**options)


def apps(srv) -> list:
    """The front-end apps of a live server: one, or one per worker (EFFNET_TEST_WORKERS)."""
    return list(getattr(srv, "apps", [srv.app]))


def fp32_binary(x: np.ndarray, **extra) -> tuple[bytes, dict[str, str]]:
    """A /v2 request with an FP32 tensor as binary data (tritonclient's default)."""
    head = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}], **extra}).encode()
    return head + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                              "Content-Type": "application/octet-stream"}


def fp32_json(n: int, **extra) -> bytes:
    """A /v2 request with n images as a JSON FP32 tensor: over IN_PROCESS_BYTES from n = 4."""
    x = np.random.default_rng(0).standard_normal((n, 3, CROP, CROP)).astype(np.float32)
    return json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.round(4).tolist()}], **extra}).encode()


def deep(n: int) -> list:
    v: list = []
    for _ in range(n):
        v = [v]
    return v


# --- finding 4: multipart ------------------------------------------------------------------------------
FLOOD_MB = 10
FLOOD = (b'--a\r\nContent-Disposition: form-data; name="file"\r\n\r\n'
         + b"\r\n--aX" * (FLOOD_MB * 1024 * 1024 // 6) + b"\r\n--a--\r\n")


def test_a_body_of_delimiters_is_refused_from_their_count_before_python_multipart_walks_it():
    with pytest.raises(BadRequest) as caught:
        parse_multipart(FLOOD, {b"boundary": b"a"})
    assert f"at most {MAX_PARTS} multipart parts" in caught.value.message
    # The count allows exactly what a valid body of MAX_PARTS parts holds, with or without a leading CRLF.
    body, ctype = multipart(*[b"x"] * MAX_PARTS)
    boundary = ctype.split("boundary=")[1].encode()
    assert len(parse_multipart(b"\r\n" + body, {b"boundary": boundary})) == MAX_PARTS


def test_a_multipart_delimiter_flood_leaves_liveness_answering(tiny_repo):
    senders, rounds = 3, 2
    with live_server(settings(tiny_repo, decode_workers=2)) as srv:
        answers: list[tuple[int, str]] = []
        probes: list[float] = []
        stop = threading.Event()

        def flood() -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                for _ in range(rounds):
                    r = c.post("/classify", content=FLOOD, headers={"content-type": "multipart/form-data; boundary=a"})
                    answers.append((r.status_code, error_of(r.status_code, r.headers, r.content)["message"]))

        def probe() -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    assert c.get("/health/live").status_code == 200
                    probes.append(time.monotonic() - t0)
                    time.sleep(0.05)

        with ThreadPoolExecutor(senders + 1) as pool:
            prober = pool.submit(probe)
            try:
                for f in [pool.submit(flood) for _ in range(senders)]:
                    f.result(timeout=300)
            finally:
                stop.set()
            prober.result(timeout=60)
    assert probes and max(probes) < 2.0, sorted(probes)[-5:]  # each body stalled the loop 2-3 s before
    assert [status for status, _ in answers] == [400] * (senders * rounds), answers
    assert all("multipart parts" in message for _, message in answers), answers


# --- finding 5: gzip and the memory budget -----------------------------------------------------------
def test_decompressed_bytes_are_charged_and_given_back():
    budget = MemoryBudget(1 << 20)
    body = gzip.compress(bytes(3 << 20))
    with pytest.raises(OverBudget):
        decode_content(body, "gzip", 20 << 20, budget)
    small = gzip.compress(bytes(100_000))
    budget = MemoryBudget(1 << 20)
    assert decode_content(small, "gzip", 20 << 20, budget) == bytes(100_000)
    assert budget.used == 100_000 and budget.peak == 200_000  # one copy held, two for a moment
    # Exactly one piece long, then more: zlib may keep output back when a piece fills to the byte.
    exact = bytes(1 << 20) + b"tail"
    assert decode_content(gzip.compress(exact), "gzip", 20 << 20) == exact


def test_every_gzip_member_is_inflated_and_a_cut_or_padded_stream_is_refused():
    """A gzip body may be several members one after another (RFC 1952 2.2; gzip, curl and Triton's server
    inflate them all): once only the first was, and the request silently lost the rest. A stream cut before its
    checksum was taken as whole. Each now: all members (at most MAX_GZIP_MEMBERS), or a 400 saying why."""
    from effnet_serve.api.v2.codec import MAX_GZIP_MEMBERS

    assert decode_content(gzip.compress(b'{"inputs": [') + gzip.compress(b"]}"), "gzip", 1 << 20) == b'{"inputs": []}'
    big = bytes(3 << 20) + b"end"  # members of several pieces each
    assert decode_content(gzip.compress(big) + gzip.compress(big), "gzip", 20 << 20) == big + big
    with pytest.raises(BadRequest, match="ends before its stream does"):
        decode_content(gzip.compress(b"x" * 10_000)[:-8], "gzip", 1 << 20)  # no CRC32 and length trailer
    with pytest.raises(BadRequest, match="ends before its stream does"):
        decode_content(b"", "gzip", 1 << 20)
    with pytest.raises(BadRequest, match="after the end of its deflate stream"):
        decode_content(zlib.compress(b"{}") + b"junk", "deflate", 1 << 20)
    with pytest.raises(BadRequest, match="not valid gzip data"):
        decode_content(gzip.compress(b"{}") + b"junk", "gzip", 1 << 20)
    assert decode_content(gzip.compress(b"") * MAX_GZIP_MEMBERS, "gzip", 1 << 20) == b""
    with pytest.raises(BadRequest, match=f"more than {MAX_GZIP_MEMBERS} gzip members"):
        decode_content(gzip.compress(b"") * (MAX_GZIP_MEMBERS + 1), "gzip", 1 << 20)


def test_a_gzip_tensor_is_charged_at_its_decompressed_size(tiny_repo):
    x = np.zeros((64, 3, CROP, CROP), np.float32)  # 3 MB: over a 1 MB budget whichever way it travels
    body, headers = fp32_binary(x)
    small, small_headers = fp32_binary(np.zeros((1, 3, CROP, CROP), np.float32))
    with live_server(settings(tiny_repo, max_inflight_mb=1)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        plain = c.post(INFER, content=body, headers=headers)
        zipped = c.post(INFER, content=gzip.compress(body), headers={**headers, "Content-Encoding": "gzip"})
        assert len(gzip.compress(body)) < 10_000
        for r in (plain, zipped):
            assert r.status_code == 503 and r.headers["retry-after"], (r.status_code, r.text)
            assert "limit of 1 MB" in r.json()["error"]
        ok = c.post(INFER, content=gzip.compress(small), headers={**small_headers, "Content-Encoding": "gzip"})
        assert ok.status_code == 200, ok.text
        until(lambda: srv.plane.memory.used == 0, what="the budget back to 0")
        assert srv.plane.memory.peak >= 2 * x[:1].nbytes  # the small one was charged, decompressed


# --- finding 6: the JSON worker -----------------------------------------------------------------------
@pytest.fixture
def manifest(tmp_path):
    return load_manifest(write_model(tmp_path, "fake", crop=32, resize=36))


@pytest.fixture
def worker():
    w = JsonWorker()
    yield w
    w.close()


def _big_fp32(n: int = 16, **extra) -> bytes:
    x = np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.tolist()}], **extra}).encode()
    assert len(body) > IN_PROCESS_BYTES
    return body


def test_empty_lists_count_as_elements(manifest):
    body = json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                   "data": [[]] * 100_000}]}).encode()
    with pytest.raises(ApiError) as caught:
        parse_infer(body, None, manifest, 64)
    assert caught.value.status == 400 and "more elements" in caught.value.message
    nested = json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                     "data": deep(50)}]}).encode()
    with pytest.raises(ApiError) as caught:
        parse_infer(nested, None, manifest, 64)
    assert caught.value.status == 400


def test_an_output_is_asked_for_once(manifest):
    body = json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "data": [0.0] * 3072}],
                       "outputs": [{"name": "logits"}] * 2}).encode()
    with pytest.raises(ApiError) as caught:
        parse_infer(body, None, manifest, 64)
    assert caught.value.status == 400 and "more than once" in caught.value.message


def test_a_header_nested_900_deep_comes_back_from_the_worker_without_it(worker, manifest):
    inp = worker.parse(_big_fp32(id=deep(900)), None, manifest, 64, 4 << 20)
    assert worker._pool is not None and len(inp.tensors) == 16 and "id" not in inp.request


@contextlib.contextmanager
def stopped(workers: list[JsonWorker], manifest) -> Iterator[None]:
    """Each JSON worker process started (one real parse) and then stopped with SIGSTOP until the block ends."""
    pids = []
    for w in workers:
        with contextlib.suppress(ApiError):  # a 32 px tensor for whichever model: the process is what counts
            w.parse(_big_fp32(), None, manifest, 64, 4 << 20)
        pids += list(w._pool._processes)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_waiting_for_the_worker_is_bounded_in_number_and_time(worker, manifest):
    async def run() -> None:
        body = _big_fp32()
        first = asyncio.ensure_future(worker.parse_async(body, None, manifest, 64, 4 << 20, timeout_s=2, max_waiting=1))
        await asyncio.sleep(0)  # the first is waiting now
        with pytest.raises(Overloaded) as busy:
            await worker.parse_async(body, None, manifest, 64, 4 << 20, timeout_s=2, max_waiting=1)
        assert busy.value.status == 503 and busy.value.headers["Retry-After"]
        with pytest.raises(Unavailable) as late:
            await first
        assert "not parsed within 2 s" in late.value.message and worker.waiting == 0

    with stopped([worker], manifest):
        asyncio.run(run())


def test_a_stopped_json_worker_holds_no_decode_thread(tiny_repo, tmp_path):
    # One decode thread per front end: before, a big JSON body's caller held it waiting on the worker.
    big = fp32_json(8)
    assert len(big) > IN_PROCESS_BYTES
    manifest = load_manifest(tiny_repo / "tiny")
    srv_settings = settings(tiny_repo, json_worker_queue=2, json_worker_timeout_s=3)
    with live_server(srv_settings) as srv, stopped([a.state.json_worker for a in apps(srv)], manifest), \
            ThreadPoolExecutor(6) as pool:
        def post_big() -> httpx.Response:
            return httpx.post(srv.url + INFER, content=big, headers={"content-type": "application/json"}, timeout=60)

        bigs = [pool.submit(post_big) for _ in range(6)]
        until(lambda: sum(a.state.json_worker.waiting for a in apps(srv)) >= len(apps(srv)),
              what="big bodies waiting on the stopped worker")
        r = httpx.post(srv.url + "/classify", content=png((32, 32)), headers={"content-type": "image/png"},
                       timeout=20)
        assert r.status_code == 200, r.text
        for f in bigs:
            b = f.result(timeout=60)
            assert b.status_code == 503 and b.headers["retry-after"], b.text
            assert set(b.json()) == {"error"}


def test_a_deep_json_header_is_not_a_500(tiny_repo, caplog):
    body = fp32_json(8, id=deep(900))
    with live_server(settings(tiny_repo)) as srv, caplog.at_level(logging.WARNING):
        r = httpx.post(srv.url + INFER, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    assert "id" not in r.json()
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged for client input"


# --- finding 8: decoded pixels per request -----------------------------------------------------------
FLAT = flat_png(3000)  # ~30 kB that decode to 9 megapixels


def test_a_jpeg_counts_at_the_scale_it_decodes_at(manifest):
    pp = manifest.preprocess
    allowance = PixelAllowance(1_000_000)
    photo = encode(real_photo((4000, 3000)), "JPEG", quality=90)  # 12 MP: drafted to 1/8 for a 36 px resize
    prepare(photo, pp, 50_000_000, pixels=allowance)
    assert 0 < allowance.limit - allowance.left <= 1_000_000
    with pytest.raises(PayloadTooLarge):
        prepare(flat_png(1100), pp, 50_000_000, pixels=allowance)


@pytest.mark.parametrize("route", ["classify", "v2"])
def test_a_request_of_small_files_cannot_ask_for_gigapixels(tiny_repo, route):
    with live_server(settings(tiny_repo, max_request_pixels=20_000_000)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        def send(n: int) -> httpx.Response:
            if route == "classify":
                body, ctype = multipart(*[FLAT] * n)
                return c.post("/classify", content=body, headers={"content-type": ctype})
            elements = [base64.b64encode(FLAT).decode()] * n
            body = json.dumps({"inputs": [{"name": "images", "shape": [n], "datatype": "BYTES", "data": elements}]})
            return c.post(INFER, content=body, headers={"content-type": "application/json"})

        ok = send(2)  # 18 megapixels
        assert ok.status_code == 200, ok.text
        refused = send(3)  # 27
        assert refused.status_code == 413, refused.text
        message = (error_of(413, refused.headers, refused.content)["message"] if route == "classify"
                   else refused.json()["error"])
        assert "EFFNET_MAX_REQUEST_PIXELS" in message
        until(lambda: srv.plane.memory.used == 0, what="the budget back to 0")
