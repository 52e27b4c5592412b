"""The Open Inference Protocol over gRPC (app/api/grpc), driven by the real `tritonclient.grpc` client (and by
its generated stub for the typed contents tritonclient never sends), against a real server.

Every answer is checked against what the test works out on its own: logits and classifications from ONNX
Runtime run directly on the model file, descriptions from the model's manifest.json read as plain JSON,
the ONNX file's own digest and the server's settings. (HTTP shares the description code with gRPC, so
agreeing with HTTP would prove nothing about either.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import tomllib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from serving_helpers import LiveServer, encode, live_server, make_live_server, photo, queue_held, write_model
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from effnet_serve.core.config import Settings
from effnet_serve.engine.manifest import load_manifest
from effnet_serve.engine.preprocess import prepare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(**kw) -> Iterator[LiveServer]:
    with live_server(Settings(threads=1, decode_workers=2, grpc_port=free_port(), **kw)) as srv:
        yield srv


def _target(srv: LiveServer) -> str:
    return f"127.0.0.1:{srv.app.state.grpc.port}"


MAX_BATCH = 4  # not the CPU default (8): the model configuration must report what the server was given
MAX_DELAY_MS = 3.0


@pytest.fixture(scope="module")
def server(tiny_family_repo: Path) -> Iterator[LiveServer]:
    """tiny (64 px) and tiny2 (96 px); messages up to 6 MB (above grpc's own 4 MiB default)."""
    yield from _serve(repository=tiny_family_repo, default_model="tiny", max_body_mb=6.0, admission_wait_ms=0,
                      max_batch=MAX_BATCH, max_delay_ms=MAX_DELAY_MS)


@pytest.fixture(scope="module")
def manifests(tiny_family_repo) -> dict[str, dict]:
    """Each model's manifest.json as plain JSON, and the sha256 of its ONNX file computed here."""
    out = {}
    for name in ("tiny", "tiny2"):
        m = json.loads((tiny_family_repo / name / "manifest.json").read_text())
        m["file_sha256"] = hashlib.sha256((tiny_family_repo / name / m["onnx"]["file"]).read_bytes()).hexdigest()
        out[name] = m
    return out


@pytest.fixture(scope="module")
def client(server) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(_target(server))
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(_target(server), options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield service_pb2_grpc.GRPCInferenceServiceStub(ch)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_family_repo):
    """Direct ONNX Runtime on each model file: what the logits must match."""
    runs = {}
    for name in ("tiny", "tiny2"):
        folder = tiny_family_repo / name
        m = load_manifest(folder)
        sess = ort.InferenceSession(str(folder / m.onnx.file), providers=["CPUExecutionProvider"])
        runs[name] = (m, lambda x, s=sess, i=m.onnx.input.name: s.run(None, {i: x})[0])
    return runs


def _tensor(n: int, crop: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, crop, crop)).astype(np.float32)


def _fp32_input(x: np.ndarray, name: str = "images") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.status()


def _requests(http: httpx.Client, model: str, status: str) -> float:
    m = re.search(rf'^effnet_requests_total{{model="{model}",status="{status}"}} (\S+)$', http.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def _requests_reach(http: httpx.Client, model: str, status: str, want: float) -> float:
    """The count once it reaches `want` (or what it is after 10 s). Split in processes, a worker tells the
    engine how a request ended without waiting for it, so a /metrics read through another worker may run
    a moment before that message is read."""
    deadline = time.monotonic() + 10
    while (got := _requests(http, model, status)) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


# --- health and descriptions ------------------------------------------------------------------
def test_health_server_and_model_metadata_describe_the_model_files(client, http, manifests, tiny_family_repo):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny2", model_version="1")
    assert not client.is_model_ready("nope")  # Triton's answer for an unknown model: not ready, no error
    assert not client.is_model_ready("tiny", model_version="7")

    server = client.get_server_metadata()
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert server.name == "effnet-serve" == project["name"] and server.version == project["version"]
    assert sorted(server.extensions) == ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
    assert list(server.extensions) == http.get("/v2").json()["extensions"]  # and the same list over HTTP

    for name, m in manifests.items():
        meta = client.get_model_metadata(name)
        # The version follows the ONNX file: the first 12 hex digits of its sha256.
        assert (meta.name, list(meta.versions), meta.platform) == (name, [m["file_sha256"][:12]], "onnxruntime_onnx")
        crop, classes = m["preprocess"]["crop"], len(m["labels"])
        inputs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
        outputs = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
        assert inputs == [(m["onnx"]["input"]["name"], "FP32", [-1, 3, crop, crop])]
        assert outputs == [(m["onnx"]["output"]["name"], "FP32", [-1, classes])]
        # ... which is what the ONNX file itself declares (its batch axis is symbolic).
        sess = ort.InferenceSession(str(tiny_family_repo / name / m["onnx"]["file"]), providers=["CPUExecutionProvider"])
        (i,), (o,) = sess.get_inputs(), sess.get_outputs()
        assert (i.name, i.shape[1:], i.type) == (meta.inputs[0].name, [3, crop, crop], "tensor(float)")
        assert (o.name, o.shape[1:], o.type) == (meta.outputs[0].name, [classes], "tensor(float)")
    assert list(client.get_model_metadata("tiny").inputs[0].shape) == [-1, 3, 64, 64]
    version = client.get_model_metadata("tiny").versions[0]
    assert client.get_model_metadata("tiny", model_version=version).name == "tiny"

    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert _code(e) == "StatusCode.NOT_FOUND" and "unknown model" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("tiny", model_version="7")
    assert _code(e) == "StatusCode.NOT_FOUND"


def test_model_config_describes_the_model_and_the_servers_settings(client, manifests):
    for name, m in manifests.items():
        config = client.get_model_config(name).config
        assert (config.name, config.platform, config.backend) == (name, "onnxruntime_onnx", "onnxruntime")
        assert config.max_batch_size == MAX_BATCH
        (inp,), (out,) = config.input, config.output
        crop = m["preprocess"]["crop"]
        assert inp.name == m["onnx"]["input"]["name"] and list(inp.dims) == [3, crop, crop]  # no batch axis
        assert grpcclient.model_config_pb2.DataType.Name(inp.data_type) == "TYPE_FP32"
        assert out.name == m["onnx"]["output"]["name"] and list(out.dims) == [len(m["labels"])]
        assert config.dynamic_batching.max_queue_delay_microseconds == int(MAX_DELAY_MS * 1000)
        assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4]  # powers of two up to MAX_BATCH
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("nope")
    assert _code(e) == "StatusCode.NOT_FOUND"


# --- inference ----------------------------------------------------------------------------------
def test_infer_fp32_raw_contents_matches_onnxruntime(client, reference):
    _, run = reference["tiny"]
    x = _tensor(2)
    res = client.infer("tiny", [_fp32_input(x)], outputs=[grpcclient.InferRequestedOutput("logits")], request_id="g-1")
    logits = res.as_numpy("logits")
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, run(x), rtol=1e-4, atol=1e-4)
    resp = res.get_response()
    assert resp.id == "g-1" and resp.model_name == "tiny" and resp.outputs[0].datatype == "FP32"
    # No outputs named: the model's output, raw.
    x = _tensor(1, crop=96, seed=4)
    np.testing.assert_allclose(client.infer("tiny2", [_fp32_input(x)]).as_numpy("logits"), reference["tiny2"][1](x),
                               rtol=1e-4, atol=1e-4)


def test_infer_jpeg_with_class_count_matches_onnxruntime(client, reference, manifests):
    m, run = reference["tiny"]
    labels = manifests["tiny"]["labels"]
    jpegs = [encode(photo((320, 240), seed=s)) for s in (0, 1)]
    # The server's preprocessing of each image, then the model file run here.
    logits = run(np.stack([prepare(j, m.preprocess, 50_000_000).tensor for j in jpegs])).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)

    inp = grpcclient.InferInput("images", [2], "BYTES")
    inp.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
    res = client.infer("tiny", [inp], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    top = res.as_numpy("logits")
    assert top.shape == (2, 3) and res.get_output("logits").datatype == "BYTES"
    for row, p in zip(top, probs):
        parts = [s.decode().split(":", 2) for s in row]  # "score:index:label", best first
        best = np.argsort(-p, kind="stable")[:3]
        assert [(int(i), label) for _, i, label in parts] == [(int(k), labels[k]) for k in best]
        np.testing.assert_allclose([float(s) for s, _, _ in parts], p[best], rtol=0, atol=1e-5)
    # Raw logits for the same images.
    inp = grpcclient.InferInput("images", [2, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[j] for j in jpegs], dtype=np.object_))
    np.testing.assert_allclose(client.infer("tiny", [inp]).as_numpy("logits"), logits, rtol=1e-4, atol=1e-4)


def test_typed_contents_fp32_and_bytes(stub, reference):
    m, run = reference["tiny"]
    x = _tensor(2, seed=9)
    req = pb.ModelInferRequest(model_name="tiny", id="typed")
    t = req.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    resp = stub.ModelInfer(req, timeout=30)
    assert resp.id == "typed" and list(resp.outputs[0].shape) == [2, 1000]
    logits = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(2, 1000)
    np.testing.assert_allclose(logits, run(x), rtol=1e-4, atol=1e-4)

    jpeg = encode(photo((200, 300), seed=2))
    req = pb.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="images", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(jpeg)
    req.outputs.add(name="logits").parameters["classification"].int64_param = 2
    resp = stub.ModelInfer(req, timeout=30)
    assert resp.outputs[0].datatype == "BYTES" and list(resp.outputs[0].shape) == [1, 2]
    first = resp.raw_output_contents[0]
    n = int.from_bytes(first[:4], "little")
    best = np.argsort(-run(prepare(jpeg, m.preprocess, 50_000_000).tensor[None])[0], kind="stable")[0]
    assert first[4:4 + n].decode().split(":")[1] == str(best)


def test_errors_map_to_status_codes(client, stub):
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [_fp32_input(_tensor(1))])
    assert _code(e) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [_fp32_input(_tensor(1, crop=32))])
    assert _code(e) == "StatusCode.INVALID_ARGUMENT" and "[N, 3, 64, 64]" in e.value.message()
    bad = grpcclient.InferInput("images", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [bad])
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [_fp32_input(_tensor(1))], outputs=[grpcclient.InferRequestedOutput("probs")])
    assert _code(e) == "StatusCode.INVALID_ARGUMENT" and "logits" in e.value.message()
    for dtype in ("INT64", "FP16"):
        inp = grpcclient.InferInput("images", [1, 3, 64, 64], dtype)
        inp.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.int64 if dtype == "INT64" else np.float16))
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny", [inp])
        assert _code(e) == "StatusCode.INVALID_ARGUMENT"

    # Hand-built messages: what tritonclient would not send.
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="images", datatype="FP32", shape=[1, 3, 64, 64])
    with pytest.raises(grpc.RpcError) as e:  # no data at all
        stub.ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    req.raw_input_contents.append(_tensor(1).tobytes()[:-4])  # one value short
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "FP32 values" in e.value.details()
    req.inputs[0].contents.fp32_contents.append(1.0)  # raw and typed both
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="images", datatype="BYTES", shape=[257])  # more than EFFNET_MAX_QUEUE images
    req.raw_input_contents.append(b"\x01\x00\x00\x00x" * 257)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 256 images" in e.value.details()


def test_message_size_limit_is_the_body_limit(client, reference):
    """EFFNET_MAX_BODY_MB (6 here), not grpc's default 4 MiB: 5.1 MB is served, 7.2 MB is refused."""
    x = _tensor(46, crop=96, seed=1)  # 46 x 110.6 kB
    assert 4 << 20 < x.nbytes < 6 << 20
    np.testing.assert_allclose(client.infer("tiny2", [_fp32_input(x)]).as_numpy("logits"), reference["tiny2"][1](x),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny2", [_fp32_input(_tensor(65, crop=96))])
    assert _code(e) == "StatusCode.RESOURCE_EXHAUSTED"


def test_full_queue_is_unavailable_with_retry_after(server, stub, http):
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="images", datatype="FP32", shape=[1, 3, 64, 64])
    req.raw_input_contents.append(_tensor(1).tobytes())
    before = _requests(http, "tiny", "503")
    with queue_held(server, "tiny", server.plane.settings.max_queue):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert int(dict(e.value.trailing_metadata())["retry-after"]) >= 1
    assert _requests(http, "tiny", "503") == before + 1  # the data plane counted the refusal, once
    assert stub.ModelInfer(req, timeout=30).outputs[0].name == "logits"


def test_client_deadline_tightens_the_request_timeout(server, client):
    seen = []
    plane = server.plane
    real_open = plane.open

    def spy(entry, arrived=None, timeout_s=None):
        seen.append(timeout_s)
        return real_open(entry, arrived, timeout_s)

    plane.open = spy
    try:
        client.infer("tiny", [_fp32_input(_tensor(1))], client_timeout=5.0)
        client.infer("tiny", [_fp32_input(_tensor(1))])
    finally:
        del plane.open
    # grpc-timeout travels rounded up to its unit, hence the slack above 5 s.
    assert 4.0 < seen[0] <= 5.1 and seen[1] is None


def test_metrics_count_grpc_requests(client, http):
    before = _requests(http, "tiny", "200")
    for _ in range(3):
        client.infer("tiny", [_fp32_input(_tensor(1))])
    assert _requests_reach(http, "tiny", "200", before + 3) == before + 3
    before_400 = _requests(http, "tiny", "400")
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [_fp32_input(_tensor(1, crop=32))])
    assert _requests_reach(http, "tiny", "400", before_400 + 1) == before_400 + 1


def test_repository_control_is_refused_unless_explicit(client):
    rows = {r.name: r for r in client.get_model_repository_index().models}
    assert rows["tiny"].state == "READY" and rows["tiny2"].state == "READY"
    with pytest.raises(InferenceServerException) as e:
        client.load_model("tiny")
    assert _code(e) == "StatusCode.PERMISSION_DENIED" and "explicit" in e.value.message()


def test_draining_refuses_inference_with_unavailable_and_still_describes_as_http_does(server, client, http):
    """While draining, new inference is refused (UNAVAILABLE, as HTTP's 503); descriptions and the index are
    answered on both protocols alike (gRPC once refused them while HTTP answered)."""
    server.plane.draining = True
    try:
        assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("tiny")
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny", [_fp32_input(_tensor(1))])
        assert _code(e) == "StatusCode.UNAVAILABLE"
        assert client.get_model_metadata("tiny").name == http.get("/v2/models/tiny").json()["name"] == "tiny"
        assert client.get_model_config("tiny").config.name == http.get("/v2/models/tiny/config").json()["name"]
        assert client.get_server_metadata().name == http.get("/v2").json()["name"]
        assert [m.name for m in client.get_model_repository_index().models] == \
            [row["name"] for row in http.post("/v2/repository/index").json()]
    finally:
        server.plane.draining = False
    assert client.is_server_ready()


# --- API key, explicit model control, shutdown: servers of their own ------------------------------
def test_api_key_as_metadata(tmp_path):
    write_model(tmp_path, "fake")
    with live_server(Settings(repository=tmp_path, default_model="fake", threads=1, api_key="s3cret",
                              grpc_port=free_port())) as srv:
        c = grpcclient.InferenceServerClient(_target(srv))
        assert c.is_server_live() and c.is_server_ready()  # health stays open (EFFNET_API_KEY_EXEMPT)
        x = _tensor(1, crop=32)
        for headers in (None, {"authorization": "Bearer wrong"}, {"x-api-key": "S3CRET"}):
            for call in (lambda h: c.get_model_metadata("fake", headers=h), lambda h: c.infer("fake", [_fp32_input(x)], headers=h),
                         lambda h: c.get_model_repository_index(headers=h), lambda h: c.is_model_ready("fake", headers=h)):
                with pytest.raises(InferenceServerException) as e:
                    call(headers)
                assert _code(e) == "StatusCode.UNAUTHENTICATED"
        for headers in ({"authorization": "Bearer s3cret"}, {"x-api-key": "s3cret"}):
            assert c.get_model_metadata("fake", headers=headers).name == "fake"
            assert c.infer("fake", [_fp32_input(x)], headers=headers).as_numpy("logits").shape == (1, 1000)
        c.close()
    with live_server(Settings(repository=tmp_path, threads=1, api_key="s3cret", api_key_exempt=[],
                              grpc_port=free_port())) as srv:
        c = grpcclient.InferenceServerClient(_target(srv))
        with pytest.raises(InferenceServerException) as e:  # no exemption: the probes need the key too
            c.is_server_live()
        assert _code(e) == "StatusCode.UNAUTHENTICATED"
        assert c.is_server_live(headers={"authorization": "Bearer s3cret"})
        c.close()


def test_repository_index_load_unload_in_explicit_mode_and_shutdown(tmp_path):
    write_model(tmp_path, "alpha")
    with live_server(Settings(repository=tmp_path, model_control="explicit", allow_open_control=True, threads=1,
                              grpc_port=free_port())) as srv:
        target = _target(srv)
        c = grpcclient.InferenceServerClient(target)
        write_model(tmp_path, "beta", seed=1)  # appears while the server runs
        rows = {r.name: r for r in c.get_model_repository_index().models}
        assert rows["alpha"].state == "READY" and rows["beta"].state == "" and rows["beta"].version == ""
        assert not c.is_model_ready("beta")

        c.load_model("beta")
        assert c.is_model_ready("beta")
        x = _tensor(1, crop=32)
        assert c.infer("beta", [_fp32_input(x)]).as_numpy("logits").shape == (1, 1000)
        rows = {r.name: r for r in c.get_model_repository_index().models}
        assert rows["beta"].state == "READY" and rows["beta"].version == c.get_model_metadata("beta").versions[0]

        c.unload_model("beta")
        assert not c.is_model_ready("beta")
        rows = {r.name: r for r in c.get_model_repository_index().models}
        assert rows["beta"].state == "UNAVAILABLE" and rows["beta"].reason == "unloaded"
        assert [r.name for r in c.get_model_repository_index().models if r.state == "READY"] == ["alpha"]
        with pytest.raises(InferenceServerException) as e:
            c.infer("beta", [_fp32_input(x)])
        assert _code(e) == "StatusCode.UNAVAILABLE" and "unloaded" in e.value.message()

        for bad in ("../alpha", "Alpha", ""):
            with pytest.raises(InferenceServerException) as e:
                c.load_model(bad)
            assert _code(e) == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as e:  # a valid name without a folder
            c.load_model("gamma")
        assert _code(e) == "StatusCode.INVALID_ARGUMENT"
        c.close()
    # The lifespan stopped the gRPC server with the app.
    with grpc.insecure_channel(target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=2)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_a_taken_port_fails_the_start(tmp_path):
    """The port is bound exclusively (no SO_REUSEPORT): a port someone holds fails the app's start, loudly."""
    from effnet_serve.api.server import create_app

    write_model(tmp_path, "fake")

    async def start(app) -> None:
        async with app.router.lifespan_context(app):
            pass

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        app = create_app(Settings(repository=tmp_path, threads=1, grpc_port=s.getsockname()[1]))
        with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1:"):
            asyncio.run(start(app))


def test_a_call_in_flight_at_shutdown_gets_its_answer(tmp_path):
    """The lifespan stops gRPC with a grace (EFFNET_DRAIN_S) before the registry closes: a request waiting in
    its batch when the server stops is still answered."""
    import threading

    write_model(tmp_path, "fake")
    srv = make_live_server(Settings(repository=tmp_path, threads=1, max_delay_ms=1500, batch_wait="always", drain_s=10,
                              grpc_port=free_port())).start()
    c = grpcclient.InferenceServerClient(_target(srv))
    got: dict = {}

    def call() -> None:
        try:
            got["logits"] = c.infer("fake", [_fp32_input(_tensor(1, crop=32))], client_timeout=30).as_numpy("logits")
        except InferenceServerException as exc:
            got["error"] = exc

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 10
    while srv.plane.registry.entries["fake"].batcher.queued == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the request sits in its batch, waiting for company
    srv.stop()
    t.join(30)
    c.close()
    assert "error" not in got and got["logits"].shape == (1, 1000)
