"""The HTTP API over a real socket (uvicorn in a thread) with real ORT sessions on hand-made models."""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from effnet_serve.core.config import Settings
from serving_helpers import GOOD, encode, live_server, photo
from test_serve_preprocess import REFUSED

JPEG = {"content-type": "image/jpeg"}


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
    if code is not None:
        assert body["error"]["code"] == code
    assert "Traceback" not in r.text and "/work/" not in r.text
    return body["error"]


def series(metrics_text: str, name: str) -> list[str]:
    return [line for line in metrics_text.splitlines() if line.startswith(name)]


# --- classify: the happy paths ------------------------------------------------------------
def test_raw_body_answers_sorted_softmax_predictions(client, jpeg_bytes):
    r = client.post("/classify", params={"top_k": 7}, content=jpeg_bytes, headers=JPEG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fake" and body["pretrained"] is False
    assert len(body["results"]) == 1 and body["results"][0]["model"] == "fake"
    preds = body["results"][0]["predictions"]
    assert len(preds) == 7
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    assert all(p["label"] == f"class {p['index']}" for p in preds)
    timing = body["results"][0]["timing_ms"]
    assert set(timing) == {"decode", "preprocess", "queue", "inference", "total"}
    assert timing["total"] >= timing["inference"]


def test_octet_stream_and_explicit_model_and_top_k_1000(client, jpeg_bytes):
    r = client.post(
        "/classify", params={"model": "fake2", "top_k": 1000}, content=jpeg_bytes,
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200 and r.json()["model"] == "fake2"
    preds = r.json()["results"][0]["predictions"]
    assert len(preds) == 1000 and sorted(p["index"] for p in preds) == list(range(1000))
    assert sum(p["score"] for p in preds) == pytest.approx(1.0, abs=1e-3)


def test_one_file_or_several_the_answer_has_the_same_shape_one_result_per_image_in_order(client):
    red, blue = encode(Image.new("RGB", (64, 64), "red")), encode(Image.new("RGB", (64, 64), "blue"), "PNG")
    single = {}
    for name, data in (("red", red), ("blue", blue)):
        r = client.post("/classify", content=data, headers=JPEG)
        single[name] = r.json()["results"][0]["predictions"][0]["index"]
    assert single["red"] != single["blue"]  # the fake model tells colours apart

    one = client.post("/classify", files={"file": ("r.jpg", red, "image/jpeg")})
    assert one.status_code == 200 and len(one.json()["results"]) == 1
    assert one.json()["results"][0]["predictions"][0]["index"] == single["red"]

    many = client.post(
        "/classify", params={"top_k": 2},
        files=[("file", ("b.png", blue, "image/png")), ("note", (None, b"ignored")), ("file", ("r.jpg", red, "image/jpeg"))],
    )
    assert many.status_code == 200, many.text
    assert set(many.json()) == set(one.json())  # the same keys whatever the image count
    lists = [res["predictions"] for res in many.json()["results"]]
    assert [len(x) for x in lists] == [2, 2]
    assert [lists[0][0]["index"], lists[1][0]["index"]] == [single["blue"], single["red"]]


def test_multipart_file_field_without_filename_still_counts(client, jpeg_bytes):
    """A `file` part with no filename is still the image: the same answer as the raw body gets."""
    r = client.post("/classify", params={"top_k": 5}, files={"file": (None, jpeg_bytes)})
    assert r.status_code == 200, r.text
    raw = client.post("/classify", params={"top_k": 5}, content=jpeg_bytes, headers=JPEG)
    assert raw.status_code == 200, raw.text
    got, want = r.json()["results"], raw.json()["results"]
    assert len(got) == len(want) == 1
    got, want = got[0]["predictions"], want[0]["predictions"]
    assert [(p["index"], p["label"]) for p in got] == [(p["index"], p["label"]) for p in want]
    np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in want], rtol=0, atol=1e-6)


def _colour_jpegs(n: int) -> list[bytes]:
    """n small photos, each tinted differently so the fake model (mean colour -> class) tells them apart."""
    base = np.asarray(photo((48, 40)), np.float32)
    tints = np.random.default_rng(7).uniform(0.2, 1.0, (n, 3))
    return [encode(Image.fromarray(np.clip(base * t, 0, 255).astype(np.uint8)), quality=95) for t in tints]


def _top1_direct(fake_repo, name: str, images: list[bytes]) -> list[tuple[int, float]]:
    """(class, probability) the model file gives each image, by ONNX Runtime on the served preprocessing."""
    import onnxruntime as ort

    from effnet_serve.engine.manifest import load_manifest
    from effnet_serve.engine.preprocess import prepare

    m = load_manifest(fake_repo / name)
    session = ort.InferenceSession(str(fake_repo / name / m.onnx.file), providers=["CPUExecutionProvider"])
    x = np.stack([prepare(data, m.preprocess, 50_000_000).tensor for data in images])
    logits = session.run(None, {m.onnx.input.name: x})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return [(int(p.argmax()), float(p.max())) for p in probs]


def _top1_answers(r: httpx.Response) -> list[tuple[int, float]]:
    return [(res["predictions"][0]["index"], res["predictions"][0]["score"]) for res in r.json()["results"]]


def _same_answers(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=0, atol=1e-5)
    # The order is checkable: (nearly) every image has its own top-1 probability.
    assert len({round(s, 4) for _, s in expected}) >= len(expected) - 2


def test_multipart_with_64_parts_the_most_accepted_answers_every_image_in_order(client, fake_repo):
    images = _colour_jpegs(64)  # MAX_PARTS (app/api/uploads.py); 65 is refused (tests/reliability)
    r = client.post("/classify", params={"top_k": 1},
                    files=[("file", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)])
    assert r.status_code == 200, r.text
    _same_answers(_top1_answers(r), _top1_direct(fake_repo, "fake", images))


def test_more_files_than_max_batch_are_split_into_batches_and_answered_in_upload_order(client, server, fake_repo):
    entry = server.plane.registry.entries["fake"]
    images = _colour_jpegs(3 * entry.max_batch + 1)
    batches_before = entry.batcher.batches_run
    r = client.post("/classify", params={"top_k": 1},
                    files=[("file", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)])
    assert r.status_code == 200, r.text
    _same_answers(_top1_answers(r), _top1_direct(fake_repo, "fake", images))
    assert entry.batcher.batches_run - batches_before >= 4  # no batch is larger than max_batch


def test_one_bad_file_among_good_ones_refuses_the_whole_request(client, server, jpeg_bytes):
    """As the README's error table says: no partial answer, one 400 naming the problem."""
    batches_before = server.plane.registry.entries["fake"].batcher.batches_run
    files = [("file", ("a.jpg", jpeg_bytes, "image/jpeg")), ("file", ("bad.jpg", b"not an image", "image/jpeg")),
             ("file", ("c.jpg", jpeg_bytes, "image/jpeg"))]
    err = error_of(client.post("/classify", files=files), 400, "invalid_image")
    assert "not a supported image" in err["message"]
    assert server.plane.registry.entries["fake"].batcher.batches_run == batches_before  # the good ones never ran
    assert client.post("/classify", content=jpeg_bytes, headers=JPEG).status_code == 200


# --- classify: every error case ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_broken_or_hostile_images_are_400(client, name):
    error_of(client.post("/classify", content=REFUSED[name], headers=JPEG), 400, "invalid_image")


@pytest.mark.parametrize("ctype", ["text/plain", "application/json", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(client, jpeg_bytes, ctype):
    headers = {"content-type": ctype} if ctype else {}
    req = client.build_request("POST", "/classify", content=jpeg_bytes, headers=headers)
    assert ("content-type" in req.headers) == (ctype is not None)
    error_of(client.send(req), 415, "unsupported_media_type")


@pytest.mark.parametrize("top_k", ["0", "-1", "1001", "99999999999999999999", "abc", ""])
def test_bad_top_k_is_422(client, jpeg_bytes, top_k):
    err = error_of(client.post(f"/classify?top_k={top_k}", content=jpeg_bytes, headers=JPEG), 422, "validation_error")
    assert err["details"] and err["details"][0]["loc"][-1] == "top_k"


@pytest.mark.parametrize("model", ["nope", "../../etc/passwd", "x" * 5000, "ëfficiënt", "fake ", "FAKE", "%00"])
def test_unknown_model_is_404_listing_models_and_mints_no_metric_series(client, server, jpeg_bytes, model):
    err = error_of(client.post("/classify", params={"model": model}, content=jpeg_bytes, headers=JPEG), 404, "unknown_model")
    assert set(GOOD) <= set(err["available"])
    assert model not in err["message"]
    text = client.get("/metrics").text
    labels = set(re.findall(r'model="([^"]*)"', text))
    assert labels <= set(server.plane.registry.names())


def test_model_that_failed_to_load_is_503_with_reason(client, jpeg_bytes):
    r = client.post("/classify", params={"model": "badsum"}, content=jpeg_bytes, headers=JPEG)
    err = error_of(r, 503, "model_unavailable")
    assert "sha256" in err["reason"] and int(r.headers["retry-after"]) > 0


def test_empty_body_is_400(client):
    error_of(client.post("/classify", content=b"", headers=JPEG), 400, "invalid_image")


def test_multipart_without_file_or_malformed_is_400(client, jpeg_bytes):
    error_of(client.post("/classify", files={"image": ("a.jpg", jpeg_bytes, "image/jpeg")}), 400, "bad_request")
    error_of(client.post("/classify", data={"text": "hello"}, files={"other": (None, b"")}), 400, "bad_request")
    error_of(client.post("/classify", content=b"--x\r\nnot really\r\n", headers={"content-type": "multipart/form-data"}), 400)
    error_of(
        client.post("/classify", content=b"garbage without boundaries", headers={"content-type": "multipart/form-data; boundary=zz"}),
        400,
    )
    error_of(client.post("/classify", files={"file": ("a.jpg", b"", "image/jpeg")}), 400, "invalid_image")


def test_body_over_the_limit_is_413_by_content_length(client):
    big = b"\xff" * (1024 * 1024 + 1)  # the fixture's limit is 1 MiB
    err = error_of(client.post("/classify", content=big, headers=JPEG), 413, "payload_too_large")
    assert err["limit_bytes"] == 1024 * 1024
    error_of(client.post("/classify", files={"file": ("a.jpg", big, "image/jpeg")}), 413)


def _chunked(total: int, counter: list[int]):
    chunk = b"\0" * 65536
    while counter[0] < total:
        counter[0] += len(chunk)
        yield chunk


def test_chunked_body_over_the_limit_is_read_to_the_end_so_the_client_reads_its_413(client):
    """Within EFFNET_MAX_DISCARD_MB the rest is read and dropped: a client that sends everything before
    reading (urllib, requests, httpx) gets the 413, not a reset."""
    sent = [0]
    r = client.post("/classify", content=_chunked(8 * 1024 * 1024, sent), headers=JPEG)  # chunked, no length
    error_of(r, 413, "payload_too_large")
    assert r.headers["connection"] == "close"


def test_beyond_the_discard_bound_the_server_stops_reading(fake_repo):
    """Past EFFNET_MAX_DISCARD_MB a huge upload is cut off: reading it all is work the limit refuses."""
    sent = [0]
    total = 64 * 1024 * 1024
    settings = Settings(repository=fake_repo, default_model="fake", max_body_mb=1, max_discard_mb=2, threads=1)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        try:
            r = c.post("/classify", content=_chunked(total, sent), headers=JPEG)
            error_of(r, 413, "payload_too_large")
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server answered 413 and closed while we were still sending
    assert sent[0] < total // 4


def test_unknown_path_and_wrong_method_use_the_error_shape(client):
    error_of(client.get("/nope"), 404, "not_found")
    error_of(client.get("/classify"), 405, "method_not_allowed")


def test_inference_failure_is_503_for_that_request_only_and_the_model_recovers(client, server, jpeg_bytes):
    batcher = server.plane.registry.entries["fake"].batcher
    original = batcher.run

    def boom(x):
        raise RuntimeError("CUDA out of memory, /secret/path")

    batcher.run = boom
    try:
        r = client.post("/classify", content=jpeg_bytes, headers=JPEG)
        err = error_of(r, 503, "inference_failed")
        assert "secret" not in r.text and "CUDA" not in err["message"]
        assert client.post("/classify", params={"model": "fake2"}, content=jpeg_bytes, headers=JPEG).status_code == 200
    finally:
        batcher.run = original
    assert client.post("/classify", content=jpeg_bytes, headers=JPEG).status_code == 200
    text = client.get("/metrics").text
    assert 'effnet_requests_rejected_total{model="fake",reason="inference_error"}' in text


# --- models, health, metrics, docs --------------------------------------------------------
def test_models_lists_every_model_with_facts_or_reason(client):
    body = client.get("/models").json()
    assert body["default"] == "fake"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"fake", "fake2", "badsum", "truncated", "nofile"}  # not the hidden .tmp folder
    fake = by_name["fake"]
    assert fake["status"] == "ready" and fake["provider"] == "CPUExecutionProvider"
    assert fake["preprocess"]["crop"] == 32 and fake["resolution"] == 32 and fake["macs"] == 3000
    assert fake["accuracy"]["reference"]["top1"] == 77.1 and fake["accuracy"]["measured"] is None
    assert fake["max_batch"] == 8 and fake["batch_sizes"] == [1, 2, 4, 8]
    assert "sha256" in by_name["badsum"]["reason"]
    assert "onnxruntime" in by_name["truncated"]["reason"]
    assert "missing" in by_name["nofile"]["reason"]
    assert all(by_name[n]["status"] == "unavailable" and by_name[n]["provider"] is None for n in ("badsum", "truncated", "nofile"))
    assert client.get("/models/fake2").json()["preprocess"]["resize"] == 56
    error_of(client.get("/models/../etc"), 404)
    error_of(client.get("/models/nope"), 404, "unknown_model")


def test_readiness_names_the_models_that_are_not_ready(client):
    assert client.get("/health/live").json() == {"status": "alive", "models": []}
    err = error_of(client.get("/health/ready"), 503, "not_ready")
    assert set(err["models"]) == {"badsum", "truncated", "nofile"}


def test_without_strict_readiness_one_broken_model_does_not_take_the_pod_out(fake_repo):
    """EFFNET_STRICT_READINESS=false (Triton's --strict-readiness=false): ready once loading is over and a
    model serves; the broken ones are named in the answer, and the V2 probe agrees."""
    settings = Settings(repository=fake_repo, models=["fake", "badsum"], strict_readiness=False)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/health/ready")
        assert r.status_code == 200, r.text
        assert r.json()["models"] == ["fake"] and set(r.json()["unavailable"]) == {"badsum"}
        assert c.get("/v2/health/ready").status_code == 200
    with live_server(Settings(repository=fake_repo, models=["badsum"], strict_readiness=False)) as srv:
        assert httpx.get(srv.url + "/health/ready").status_code == 503  # nothing serves: not ready


def test_ready_when_every_configured_model_is_loaded(fake_repo):
    with live_server(Settings(repository=fake_repo, models=["fake2", "fake"], default_model="b0")) as srv:
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/health/ready").json() == {"status": "ready", "models": ["fake2", "fake"]}
            assert c.get("/models").json()["default"] == "fake2"  # b0 absent: the first loaded one
    with live_server(Settings(repository=fake_repo, models=["fake", "ghost"])) as srv:
        with httpx.Client(base_url=srv.url) as c:
            err = error_of(c.get("/health/ready"), 503)
            assert "ghost" in err["models"] and "no folder" in err["models"]["ghost"]


def test_metrics_have_the_agreed_names_and_model_facts(client, jpeg_bytes):
    client.post("/classify", content=jpeg_bytes, headers=JPEG)
    client.post("/classify", content=b"junk", headers=JPEG)
    text = client.get("/metrics").text
    for name in (
        "effnet_request_duration_seconds_bucket", "effnet_stage_duration_seconds_bucket", "effnet_batch_size_bucket",
        "effnet_queue_depth", "effnet_requests_total", "effnet_requests_rejected_total", "effnet_model_info",
        "effnet_model_macs", "effnet_model_params", "effnet_model_accuracy",
    ):
        assert series(text, name), name
    for stage in ("decode", "preprocess", "queue", "inference"):
        assert f'effnet_stage_duration_seconds_count{{model="fake",stage="{stage}"}}' in text
    assert 'effnet_requests_total{model="fake",status="200"}' in text
    assert 'effnet_requests_rejected_total{model="fake",reason="invalid_image"}' in text
    assert 'effnet_model_info{model="fake",pretrained="false",provider="CPUExecutionProvider",resolution="32"} 1.0' in text
    assert 'effnet_model_accuracy{metric="top1",model="fake",source="reference"} 77.1' in text
    assert not any('model="badsum"' in line for line in series(text, "effnet_model_info"))


def test_openapi_describes_the_body_and_error_responses(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/classify"]["post"]
    assert set(op["requestBody"]["content"]) == {"image/*", "application/octet-stream", "multipart/form-data"}
    assert {"200", "400", "404", "413", "415", "422", "503"} <= set(op["responses"])
    assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert client.get("/docs").status_code == 200


def test_cors_is_off_by_default(client):
    r = client.options("/classify", headers={"origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers


# --- security, overload, deadline -----------------------------------------------------------
def test_api_key_guards_everything_but_health_and_metrics(fake_repo, jpeg_bytes):
    with live_server(Settings(repository=fake_repo, models=["fake"], api_key="s3cret")) as srv:
        with httpx.Client(base_url=srv.url) as c:
            error_of(c.post("/classify", content=jpeg_bytes, headers=JPEG), 401, "unauthorized")
            error_of(c.post("/classify", content=jpeg_bytes, headers={**JPEG, "x-api-key": "s3cre"}), 401)
            error_of(c.get("/models", headers={"authorization": "Bearer wrong"}), 401)
            assert c.post("/classify", content=jpeg_bytes, headers={**JPEG, "x-api-key": "s3cret"}).status_code == 200
            assert c.get("/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
            assert c.get("/health/ready").status_code == 200 and c.get("/metrics").status_code == 200


def _gated(srv, name: str) -> threading.Event:
    """Make the model block until the returned event is set (it is set at teardown anyway). The event's
    `entered` is set once a batch is inside the model."""
    batcher = srv.plane.registry.entries[name].batcher
    original, gate = batcher.run, threading.Event()
    gate.entered = threading.Event()

    def run(x):
        gate.entered.set()
        gate.wait(60)
        return original(x)

    batcher.run = run
    return gate


async def _until(done, what: str, timeout: float = 30.0) -> None:
    """Poll a condition from the event loop, with a deadline generous enough for a loaded machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        assert loop.time() < deadline, f"waited {timeout:g} s for {what}"
        await asyncio.sleep(0.01)


def test_overload_is_refused_at_once_with_retry_after_and_accepted_requests_finish(fake_repo, jpeg_bytes):
    # No admission wait: the excess is refused the moment the queue is full.
    settings = Settings(repository=fake_repo, models=["fake"], max_queue=4, max_batch=2, max_delay_ms=0,
                        admission_wait_ms=0)
    with live_server(settings) as srv:
        gate = _gated(srv, "fake")

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=httpx.Limits(max_connections=100)) as c:
                tasks = [asyncio.create_task(c.post("/classify", content=jpeg_bytes, headers=JPEG)) for _ in range(40)]
                while sum(t.done() for t in tasks) < 30:  # the refusals come back while the model is blocked
                    await asyncio.sleep(0.01)
                gate.set()
                return await asyncio.gather(*tasks)

        try:
            responses = asyncio.run(asyncio.wait_for(burst(), 30))
        finally:
            gate.set()
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}
        # Admitted: the batch that blocks in the model (2) plus a full queue behind it (4).
        assert 1 <= codes.count(200) <= 6 and codes.count(503) >= 30
        refused = [r for r in responses if r.status_code == 503]
        assert all(error_of(r, 503, "overloaded") and int(r.headers["retry-after"]) >= 1 for r in refused)
        with httpx.Client(base_url=srv.url) as c:  # recovered once the burst is over
            assert c.post("/classify", content=jpeg_bytes, headers=JPEG).status_code == 200
            assert 'reason="queue_full"' in c.get("/metrics").text


def test_requests_waiting_past_the_deadline_get_503(fake_repo, jpeg_bytes):
    """The first request holds the model; the second waits behind it past its deadline and is refused
    when the model frees up. Every step waits on an event, not on the clock, except the deadline itself:
    it only has to be long enough for the first request to reach the model (a few ms; 2 s here)."""
    timeout_s = 2.0
    settings = Settings(repository=fake_repo, models=["fake"], max_batch=1, max_delay_ms=0, request_timeout_s=timeout_s)
    with live_server(settings) as srv:
        gate = _gated(srv, "fake")
        batcher = srv.plane.registry.entries["fake"].batcher

        async def two():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                first = asyncio.create_task(c.post("/classify", content=jpeg_bytes, headers=JPEG))
                await _until(gate.entered.is_set, "the first request to reach the model")
                second = asyncio.create_task(c.post("/classify", content=jpeg_bytes, headers=JPEG))
                await _until(lambda: batcher.queued >= 2, "the second request to wait behind the first")
                await asyncio.sleep(timeout_s + 0.5)  # now past the second's deadline, still queued
                assert not second.done()
                gate.set()
                return await first, await second

        try:
            first, second = asyncio.run(asyncio.wait_for(two(), 30))
        finally:
            gate.set()
        assert first.status_code == 200
        error_of(second, 503, "deadline_exceeded")


# --- batching under concurrency on a real EfficientNet -------------------------------------
def test_256_concurrent_requests_to_b0_all_succeed_in_real_batches(b0_repo):
    # Default queue, batch and delay settings: a burst of 256 must be absorbed, not refused.
    settings = Settings(repository=b0_repo, models=["b0"])
    images = [encode(photo((160, 120), seed=i)) for i in range(8)]
    with live_server(settings) as srv:

        async def burst():
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
                return await asyncio.gather(
                    *(c.post("/classify", params={"model": "b0"}, content=images[i % 8], headers=JPEG) for i in range(256))
                )

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 256
        # The same image gets the same answer whatever batch it rode in.
        by_image: dict[int, set] = {}
        for i, r in enumerate(responses):
            by_image.setdefault(i % 8, set()).add(r.json()["results"][0]["predictions"][0]["index"])
        assert all(len(v) == 1 for v in by_image.values())
        text = httpx.get(srv.url + "/metrics").text
        total = float(re.search(r'effnet_batch_size_sum\{model="b0"\} (\S+)', text).group(1))
        count = float(re.search(r'effnet_batch_size_count\{model="b0"\} (\S+)', text).group(1))
        assert total == 256
        assert total / count > 2, f"mean batch {total / count:.2f}"


def test_softmax_scores_match_a_direct_onnxruntime_run(tiny_repo, jpeg_bytes):
    import onnxruntime as ort

    from effnet_serve.engine.manifest import load_manifest
    from effnet_serve.engine.preprocess import prepare

    m = load_manifest(tiny_repo / "tiny")
    sess = ort.InferenceSession(str(tiny_repo / "tiny" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = prepare(jpeg_bytes, m.preprocess, 50_000_000).tensor[None]
    logits = sess.run(None, {"images": x})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    with live_server(Settings(repository=tiny_repo, models=["tiny"])) as srv:
        r = httpx.post(srv.url + "/classify", params={"model": "tiny", "top_k": 3}, content=jpeg_bytes, headers=JPEG)
    preds = r.json()["results"][0]["predictions"]
    assert [p["index"] for p in preds] == list(np.argsort(-probs)[:3])
    assert [p["score"] for p in preds] == pytest.approx(list(np.sort(probs)[::-1][:3]), abs=1e-5)
