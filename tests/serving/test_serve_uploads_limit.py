"""EFFNET_MAX_UPLOADS: at most N requests may be sending their body at once, across models and front ends.

Real sockets hold N uploads half-sent (the server is told the body's length and gets only part of it), so the
limit is reached without racing anything: the N+1th request gets the documented refusal (503, the JSON error
shape, Retry-After) whatever the machine's speed, and a slot comes back when an upload ends, by finishing or
by its client leaving.

Also here: a chunked body refused late (it passes EFFNET_MAX_BODY_MB after the grace second) is still read to
its end before the 413, so a client that sends everything before it reads gets the answer, not a reset.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from raw_http import ChunkedUpload, HeldUpload, close_all, error_of, png, read_response, until
from serving_helpers import LiveServer, live_server

from effnet_serve.api.body import GRACE_S
from effnet_serve.core.config import Settings

N = 3
IMAGE = png()
PNG = {"content-type": "image/png"}


@pytest.fixture(autouse=True)
def _no_socket_outlives_its_test():
    yield
    close_all()


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[LiveServer]:
    # No rate floor and a long body timeout: a held upload stays held until the test lets it go.
    settings = Settings(repository=tiny_repo, models=["tiny", "tiny2"], default_model="tiny", max_uploads=N,
                        min_upload_kbps=0, body_timeout_s=600, threads=1, decode_workers=2, device="cpu")
    with live_server(settings) as srv:
        yield srv


def _v2_bytes_body(image: bytes) -> bytes:
    """A /v2 infer request with one encoded image as a JSON BYTES tensor (base64)."""
    return json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(image).decode()]}]}).encode()


def _hold(srv: LiveServer, uploads: list[tuple[str, bytes, str]]) -> list[HeldUpload]:
    held = [HeldUpload(srv.port, path, body, sent=len(body) // 2, content_type=ctype) for path, body, ctype in uploads]
    # The server counts an upload once its handler runs: wait for all of them, not for a guessed time.
    until(lambda: srv.plane.uploading == len(held), what=f"{len(held)} uploads in progress")
    return held


def _refused(r: httpx.Response) -> str:
    assert r.status_code == 503, (r.status_code, r.text)
    retry = r.headers.get("retry-after")
    assert retry is not None and retry.isdigit() and int(retry) >= 1, r.headers
    return r.text


def test_the_uploads_beyond_the_limit_are_refused_and_a_finished_upload_frees_its_slot(server):
    srv = server
    v2 = _v2_bytes_body(IMAGE)
    # N uploads in progress, on two models and both front ends: the limit is one count across all of them.
    held = _hold(srv, [("/classify?model=tiny", IMAGE, "image/png"), ("/classify?model=tiny2", IMAGE, "image/png"),
                       ("/v2/models/tiny/infer", v2, "application/json")])
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for _ in range(3):  # the refusal is stable, not a one-off
            r = c.post("/classify?model=tiny2", content=IMAGE, headers=PNG)
            body = _refused(r)
            err = error_of(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)
            assert err["code"] == "overloaded" and f"{N} uploads" in err["message"], body
        r = c.post("/v2/models/tiny2/infer", content=v2, headers={"content-type": "application/json"})
        _refused(r)
        assert set(r.json()) == {"error"} and f"{N} uploads" in r.json()["error"]  # the V2 error shape
        # Requests without a body to send are not uploads: they still work.
        assert c.get("/health/ready").status_code == 200 and c.get("/models").status_code == 200
        assert srv.plane.uploading == N  # refusals took no slot

        # The held uploads were never at risk: each one finishes and is answered.
        answers = [h.finish() for h in held]
        assert [a[0] for a in answers] == [200, 200, 200], answers
        assert [json.loads(a[2])["model"] for a in answers[:2]] == ["tiny", "tiny2"]
        assert json.loads(answers[2][2])["outputs"][0]["shape"] == [1, 1000]
        until(lambda: srv.plane.uploading == 0, what="finished uploads give their slots back")

        r = c.post("/classify?model=tiny2", content=IMAGE, headers=PNG)
        assert r.status_code == 200 and r.json()["model"] == "tiny2", r.text


def test_a_client_that_leaves_mid_upload_gives_its_slot_back(server):
    srv = server
    held = _hold(srv, [("/classify?model=tiny", IMAGE, "image/png")] * N)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        _refused(c.post("/classify?model=tiny", content=IMAGE, headers=PNG))
        held[0].leave()
        until(lambda: srv.plane.uploading == N - 1, what="the departed client's slot is free")
        # Exactly one slot came back: one more upload fits, held open, and the next is refused again.
        one_more = HeldUpload(srv.port, "/classify?model=tiny", IMAGE, sent=len(IMAGE) // 2)
        until(lambda: srv.plane.uploading == N, what="the freed slot taken again")
        _refused(c.post("/classify?model=tiny", content=IMAGE, headers=PNG))
        answers = [h.finish() for h in [*held[1:], one_more]]
        assert [a[0] for a in answers] == [200] * N, answers
        until(lambda: srv.plane.uploading == 0, what="all slots free")
        assert c.post("/classify?model=tiny", content=IMAGE, headers=PNG).status_code == 200


def test_a_chunked_body_refused_after_the_grace_second_is_still_read_to_its_end(tiny_repo):
    """The 413 of a body with no Content-Length comes when the bytes so far pass the limit, which for a big
    upload is well after the grace second. Throwing the rest away must keep the rate floor counted over the
    whole body: counted afresh from 0, a client uploading at full speed is called too slow at once and the
    connection is closed on it mid-body (the reset the discard exists to prevent)."""
    chunk, pace_s = b"\0" * 4096, 0.05  # about 80 kB/s: 80x the 1 kB/s floor below, on a busy machine too
    settings = Settings(repository=tiny_repo, models=["tiny"], default_model="tiny", max_body_mb=0.25,
                        max_discard_mb=1, min_upload_kbps=1, body_timeout_s=60, threads=1, device="cpu")
    limit = settings.max_body_bytes
    with live_server(settings) as srv:
        upload = ChunkedUpload(srv.port, "/classify?model=tiny")
        upload.send(chunk)
        sent = len(chunk)
        # The server's clock for this body starts about when it counts the upload.
        until(lambda: srv.plane.uploading == 1, what="the upload being read")
        started = time.monotonic()
        while sent + len(chunk) <= limit:  # up to the limit, not past it
            upload.send(chunk)
            sent += len(chunk)
            time.sleep(pace_s)
        # Pass the limit well after the grace second, whatever the pace really was.
        time.sleep(max(0.0, started + 3 * GRACE_S - time.monotonic()))
        for _ in range(30):  # the rest, about 1.5 s more of it: the first chunk passes the limit
            try:
                upload.send(chunk)
            except OSError as e:  # a reset or broken pipe: the server closed while we were sending
                pytest.fail(f"connection closed mid-body after {sent} bytes: {e!r}")
            sent += len(chunk)
            assert not upload.heard_back(), f"the server answered or closed mid-body, after {sent} bytes"
            time.sleep(pace_s)
        assert limit < sent <= settings.max_discard_bytes
        upload.end()
        status, headers, body = read_response(upload.sock)
        assert status == 413, (status, headers, body[:300])
        err = error_of(status, headers, body)
        assert err["code"] == "payload_too_large" and err["limit_bytes"] == limit, err
        until(lambda: srv.plane.uploading == 0, what="the refused upload's slot given back")
