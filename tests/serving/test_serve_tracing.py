"""Request ids, the access log and OpenTelemetry spans (app/api/tracing.py, app/api/otel.py, app/core/tracing.py).

X-Request-Id and the access log are checked on the hand-made models (every kind of answer: 200, 4xx, the
API key's 401, the admission gate's 503, an unhandled 500); the spans on a real tiny EfficientNet with the
SDK's in-memory exporter, through a tracer provider handed to the app factory.
"""

from __future__ import annotations

import http.server
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from effnet_serve.api.tracing import RequestTracing, client_request_id
from effnet_serve.core import tracing
from effnet_serve.core.config import Settings
from prerequisites import require_module
from serving_helpers import LiveServer, encode, live_server, make_live_server, photo

KEY = {"X-API-Key": "k3y"}
JPEG = {"Content-Type": "image/jpeg"}
GENERATED = re.compile(r"^[0-9a-f]{32}$")
ACCESS_LINE = re.compile(
    r"^(?P<method>[A-Z]+) (?P<path>\S+) model=(?P<model>\S+) status=(?P<status>\d{3}) images=(?P<images>\S+) "
    r"ms=(?P<ms>\d+\.\d) id=(?P<id>\S+)$")


def _boom() -> None:
    raise RuntimeError("a bug")


@pytest.fixture(scope="module")
def keyed(fake_repo: Path) -> Iterator[LiveServer]:
    """The fake models behind an API key, with one route that fails the way a bug would (500)."""
    settings = Settings(repository=fake_repo, models=["fake", "fake2"], default_model="fake", api_key="k3y",
                        threads=1, decode_workers=2, grpc_port=0)
    srv = make_live_server(settings)
    for app in getattr(srv, "apps", [srv.app]):  # every front end, when the suite runs split (EFFNET_TEST_WORKERS)
        app.add_api_route("/test-boom", _boom)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(keyed: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        yield c


def _access_lines(caplog, request_id: str) -> list[re.Match]:
    """The parsed access-log lines of one request (the server logs from its own thread: wait a moment)."""
    for _ in range(100):
        lines = [ACCESS_LINE.match(r.getMessage()) for r in caplog.records if r.name == "effnet.access"]
        found = [m for m in lines if m is not None and m["id"] == request_id]
        if found:
            return found
        time.sleep(0.01)
    return []


# --- X-Request-Id -----------------------------------------------------------------------
def test_an_id_is_generated_for_every_answer(client, jpeg_bytes):
    ok = client.post("/classify", content=jpeg_bytes, headers={**KEY, **JPEG})
    assert ok.status_code == 200
    assert GENERATED.match(ok.headers["x-request-id"])
    again = client.post("/classify", content=jpeg_bytes, headers={**KEY, **JPEG})
    assert again.headers["x-request-id"] != ok.headers["x-request-id"]
    # Errors of every layer: a 404 from the router, a 422 from validation, a 400 from the decoder.
    for r in (client.get("/nope", headers=KEY), client.post("/classify?top_k=0", content=jpeg_bytes, headers={**KEY, **JPEG}),
              client.post("/classify", content=b"not an image", headers={**KEY, **JPEG})):
        assert r.status_code in (400, 404, 422)
        assert GENERATED.match(r.headers["x-request-id"]), r.status_code


def test_the_clients_own_id_is_echoed(client, jpeg_bytes):
    r = client.post("/classify", content=jpeg_bytes, headers={**KEY, **JPEG, "X-Request-Id": "my-trace_42/a:b.c+d@e"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-trace_42/a:b.c+d@e"
    r = client.get("/health/live", headers={"X-Request-Id": "x" * 128})
    assert r.headers["x-request-id"] == "x" * 128


@pytest.mark.parametrize("given", [b"x" * 129, b"caf\xc3\xa9", b"a\tb"], ids=["too-long", "not-ascii", "control"])
def test_an_unfit_client_id_is_replaced(client, given):
    r = client.get("/health/live", headers={"X-Request-Id": given})
    assert r.status_code == 200
    assert GENERATED.match(r.headers["x-request-id"])


def test_client_request_id_rule():
    assert client_request_id(b"abc") == b"abc"
    assert client_request_id(b"0f-A_.:/+@") == b"0f-A_.:/+@"
    for bad in (None, b"", b"\x7f", b"a\x00b", b"x" * 129, b"a b", b"a=b", b"a\n"):
        assert client_request_id(bad) is None


def test_a_401_carries_the_id(client, jpeg_bytes):
    r = client.post("/classify", content=jpeg_bytes, headers={**JPEG, "X-Request-Id": "no-key-1"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "no-key-1"
    r = client.get("/models")
    assert r.status_code == 401 and GENERATED.match(r.headers["x-request-id"])


def test_a_gate_refusal_carries_the_id(keyed, client, jpeg_bytes):
    keyed.plane.draining = True  # the admission gate answers 503 before routing
    try:
        r = client.post("/classify?model=fake", content=jpeg_bytes, headers={**KEY, **JPEG, "X-Request-Id": "refused-1"})
        v2 = client.post("/v2/models/fake/infer", content=b"{}", headers=KEY)
    finally:
        keyed.plane.draining = False
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert r.headers["x-request-id"] == "refused-1"
    assert v2.status_code == 503 and GENERATED.match(v2.headers["x-request-id"])


def test_an_unhandled_error_carries_the_id(client):
    r = client.get("/test-boom", headers={**KEY, "X-Request-Id": "boom-1"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers["x-request-id"] == "boom-1"


def test_cors_exposes_the_id(fake_repo):
    settings = Settings(repository=fake_repo, models=["fake"], default_model="fake", threads=1, grpc_port=0,
                        cors_origins="https://ui.example")
    with live_server(settings) as srv:
        r = httpx.get(srv.url + "/models", headers={"Origin": "https://ui.example"})
        pre = httpx.options(srv.url + "/classify", headers={
            "Origin": "https://ui.example", "Access-Control-Request-Method": "POST"})
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    assert GENERATED.match(r.headers["x-request-id"])
    assert pre.status_code == 200 and GENERATED.match(pre.headers["x-request-id"])


# --- the access log -----------------------------------------------------------------------
def test_one_access_line_per_request(client, caplog, jpeg_bytes):
    caplog.set_level(logging.INFO, logger="effnet.access")
    two = [("file", ("a.jpg", jpeg_bytes, "image/jpeg")), ("file", ("b.jpg", jpeg_bytes, "image/jpeg"))]
    assert client.post("/classify?model=fake2", files=two, headers={**KEY, "X-Request-Id": "log-1"}).status_code == 200
    (line,) = _access_lines(caplog, "log-1")
    assert (line["method"], line["path"], line["model"], line["status"], line["images"]) == (
        "POST", "/classify", "fake2", "200", "2")
    assert float(line["ms"]) > 0

    # The default model is named; a refusal before any image is read has no image count.
    assert client.post("/classify", content=jpeg_bytes, headers={**JPEG, "X-Request-Id": "log-2"}).status_code == 401
    (line,) = _access_lines(caplog, "log-2")
    assert (line["model"], line["status"], line["images"]) == ("fake", "401", "-")

    # V2 paths name their model too.
    client.get("/v2/models/fake", headers={**KEY, "X-Request-Id": "log-3"})
    (line,) = _access_lines(caplog, "log-3")
    assert (line["method"], line["path"], line["model"], line["status"]) == ("GET", "/v2/models/fake", "fake", "200")


def test_the_access_log_never_carries_a_clients_model_name(client, caplog, jpeg_bytes):
    # (The path is logged as it came; the model field is what log pipelines turn into labels.)
    caplog.set_level(logging.INFO, logger="effnet.access")
    r = client.post("/classify?model=made-up-by-the-client", content=jpeg_bytes, headers={**KEY, **JPEG, "X-Request-Id": "log-4"})
    assert r.status_code == 404
    client.get("/v2/models/made-up-too/ready", headers={**KEY, "X-Request-Id": "log-5"})
    for rid in ("log-4", "log-5"):
        (line,) = _access_lines(caplog, rid)
        assert line["model"] == "-"
    client.post("/classify?model=cascade:evil,names", content=jpeg_bytes, headers={**KEY, **JPEG, "X-Request-Id": "log-6"})
    (line,) = _access_lines(caplog, "log-6")
    assert line["model"] == "cascade"


def test_a_path_cannot_forge_a_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="effnet.access")
    client.get("/x%0Aforged%20line", headers={"X-Request-Id": "log-7"})
    (line,) = _access_lines(caplog, "log-7")
    assert line["path"] == "/x%0Aforged%20line" and line["status"] == "401"


def test_the_access_log_can_be_turned_off(fake_repo, monkeypatch, caplog, jpeg_bytes):
    monkeypatch.setenv("EFFNET_ACCESS_LOG", "false")
    settings = Settings(repository=fake_repo, models=["fake"], default_model="fake", threads=1, grpc_port=0)
    assert settings.access_log is False
    caplog.set_level(logging.INFO, logger="effnet.access")
    with live_server(settings) as srv:
        r = httpx.post(srv.url + "/classify", content=jpeg_bytes, headers={**JPEG, "X-Request-Id": "quiet-1"})
        time.sleep(0.1)
    assert r.status_code == 200 and r.headers["x-request-id"] == "quiet-1"  # the id stays
    assert not [rec for rec in caplog.records if rec.name == "effnet.access"]


# --- the tracing interface with tracing off ---------------------------------------------------
def test_tracing_off_costs_a_no_op(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert RequestTracing(lambda *a: None).spans is None
    assert tracing.span("decode", images=1) is tracing.OFF
    assert tracing.now_ns() == 0
    tracing.batch_spans(0, [object()])  # nothing read, nothing recorded
    with tracing.begin(tracing.RequestTrace("r1")) as trace:
        assert tracing.span("body") is tracing.OFF  # a request without a sink is not traced either
        tracing.annotate(images=3, version="v1")
        tracing.annotate(images=1, version="v2")  # a cascade's second model: the request had 3 images
        assert (trace.images, trace.version, tracing.request_id()) == (3, "v1", "r1")
    assert tracing.request_id() is None


def test_the_otlp_endpoint_turns_tracing_on(monkeypatch):
    require_module("opentelemetry.exporter.otlp.proto.http", "pip install -e '.[test]'")
    from effnet_serve.api.otel import provider_from_env

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert provider_from_env() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: nothing is sent
    provider = provider_from_env()
    try:
        assert provider.resource.attributes["service.name"] == "effnet-serve"
    finally:
        provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "classifier-eu")
    provider = provider_from_env()
    try:
        assert provider.resource.attributes["service.name"] == "classifier-eu"
    finally:
        provider.shutdown()


def test_without_the_sdk_the_server_runs_untraced(monkeypatch, caplog):
    from effnet_serve.api.otel import provider_from_env

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the otel extra were not installed
    with caplog.at_level(logging.WARNING, logger="effnet.tracing"):
        assert provider_from_env() is None
    assert "effnet-serve[otel]" in caplog.text


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps each export request's body."""

    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            self.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_spans_reach_the_otlp_endpoint_from_the_environment(fake_repo, monkeypatch, jpeg_bytes):
    require_module("opentelemetry.exporter.otlp.proto.http", "pip install -e '.[test]'")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_address[1]}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms rather than 5 s
    settings = Settings(repository=fake_repo, models=["fake"], default_model="fake", threads=1, grpc_port=0)
    try:
        with live_server(settings) as srv:
            r = httpx.post(srv.url + "/classify", content=jpeg_bytes, headers={**JPEG, "X-Request-Id": "over-otlp"})
            assert r.status_code == 200
            names: dict[str, dict] = {}
            for _ in range(300):
                for body in list(_Collector.bodies):
                    for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                        service = {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"]
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                names[span.name] = {a.key: a.value for a in span.attributes} | {"service": service}
                if "request" in names and "inference" in names:
                    break
                time.sleep(0.02)
    finally:
        collector.shutdown()
    assert {"request", "body", "decode", "queue", "inference", "answer"} <= set(names)
    assert names["request"]["effnet.request_id"].string_value == "over-otlp"
    assert names["request"]["service"] == "effnet-serve"


# --- spans --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exporter():
    require_module("opentelemetry.sdk", "pip install -e '.[test]'  (or the otel extra)")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    exporter.provider = provider
    yield exporter
    provider.shutdown()


@pytest.fixture(scope="module")
def traced(tiny_repo: Path, exporter) -> Iterator[LiveServer]:
    settings = Settings(repository=tiny_repo, models=["tiny"], default_model="tiny", threads=1, decode_workers=2,
                        grpc_port=0)
    with live_server(settings, tracer_provider=exporter.provider) as srv:
        yield srv


def _trace_of(exporter, request_id: str) -> tuple[object, list]:
    """The request span with this id and every span of its trace (the root ends after the answer is sent)."""
    for _ in range(200):
        spans = exporter.get_finished_spans()
        roots = [s for s in spans if s.name == "request" and s.attributes.get("effnet.request_id") == request_id]
        if roots:
            root = roots[0]
            return root, [s for s in spans if s.context.trace_id == root.context.trace_id and s is not root]
        time.sleep(0.01)
    raise AssertionError(f"no request span for {request_id}")


def test_a_classify_request_is_one_span_tree(traced, exporter):
    jpeg = encode(photo(seed=3))
    r = httpx.post(traced.url + "/classify?model=tiny", content=jpeg, headers={**JPEG, "X-Request-Id": "trace-me"})
    assert r.status_code == 200
    root, children = _trace_of(exporter, "trace-me")
    version = traced.plane.registry.entries["tiny"].version
    assert root.parent is None
    assert root.attributes["effnet.model"] == "tiny" and root.attributes["effnet.model_version"] == version
    assert root.attributes["effnet.images"] == 1 and root.attributes["http.response.status_code"] == 200
    assert root.attributes["http.request.method"] == "POST" and root.attributes["url.path"] == "/classify"

    by_name = {s.name: s for s in children}
    # With worker processes too: a request alone in its worker asks for both stages of admission in one message.
    assert sorted(by_name) == sorted(["admission", "answer", "body", "decode", "inference", "queue", "submit"])
    for s in children:  # every one a direct child of the request, inside it
        assert s.parent.span_id == root.context.span_id
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time, s.name
    # The batcher's queue and run lie inside the submit, which holds them and the wake-ups either side.
    submit = by_name["submit"]
    assert submit.start_time <= by_name["queue"].start_time and by_name["inference"].end_time <= submit.end_time
    assert by_name["body"].attributes["effnet.bytes"] == len(jpeg)
    assert by_name["decode"].attributes["effnet.images"] == 1 and by_name["decode"].attributes["effnet.model"] == "tiny"
    inference = by_name["inference"]
    assert inference.attributes["effnet.model"] == "tiny" and inference.attributes["effnet.model_version"] == version
    assert inference.attributes["effnet.batch_size"] == 1 and inference.attributes["effnet.images"] == 1
    # In the order the request went through them (queue and inference are placed from the batcher's timings).
    hops = ["body", "admission", "decode", "queue", "inference", "answer"]
    order = [by_name[n] for n in hops]
    assert [s.name for s in sorted(order, key=lambda s: s.start_time)] == hops
    assert by_name["queue"].end_time == inference.start_time
    timing = r.json()["results"][0]["timing_ms"]
    assert (inference.end_time - inference.start_time) / 1e6 == pytest.approx(timing["inference"], abs=0.01)


def test_a_multipart_request_counts_its_images(traced, exporter):
    files = [("file", (f"{i}.jpg", encode(photo(seed=i)), "image/jpeg")) for i in range(3)]
    r = httpx.post(traced.url + "/classify", files=files, headers={"X-Request-Id": "trace-three"})
    assert r.status_code == 200
    root, children = _trace_of(exporter, "trace-three")
    assert root.attributes["effnet.images"] == 3 and root.attributes["effnet.model"] == "tiny"
    assert [s.attributes["effnet.images"] for s in children if s.name == "decode"] == [3]
    # However the batcher split them, every image is in exactly one inference span.
    assert sum(s.attributes["effnet.images"] for s in children if s.name == "inference") == 3


def test_a_v2_tensor_request_is_traced(traced, exporter):
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    body = {"inputs": [{"name": "images", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = httpx.post(traced.url + "/v2/models/tiny/infer", json=body, headers={"X-Request-Id": "trace-v2"})
    assert r.status_code == 200, r.text
    root, children = _trace_of(exporter, "trace-v2")
    assert root.attributes["effnet.model"] == "tiny" and root.attributes["effnet.images"] == 1
    assert sorted(s.name for s in children) == sorted(["admission", "answer", "body", "inference", "parse", "queue", "submit"])


def test_a_refused_request_has_its_status_and_no_inference(traced, exporter):
    r = httpx.post(traced.url + "/classify?model=nope", content=b"x", headers={**JPEG, "X-Request-Id": "trace-404"})
    assert r.status_code == 404
    root, children = _trace_of(exporter, "trace-404")
    assert root.attributes["http.response.status_code"] == 404 and root.attributes["effnet.model"] == "-"
    assert "effnet.images" not in root.attributes
    assert not [s for s in children if s.name in ("queue", "inference")]


def test_the_callers_trace_is_joined(traced, exporter):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = httpx.get(traced.url + "/health/live", headers={
        "traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-Id": "trace-joined"})
    assert r.status_code == 200
    root, _ = _trace_of(exporter, "trace-joined")
    assert format(root.context.trace_id, "032x") == trace_id
    assert format(root.parent.span_id, "016x") == parent_id
