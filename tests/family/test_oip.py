"""The Open Inference Protocol endpoints, driven by the real tritonclient HTTP client
(and by raw HTTP for the JSON variants tritonclient does not send)."""

from __future__ import annotations

import base64
import gzip
import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from serving_helpers import encode, photo
from tritonclient.utils import InferenceServerException

from effnet_serve.engine.manifest import load_manifest
from effnet_serve.engine.preprocess import prepare


@pytest.fixture(scope="module")
def triton(family_server):
    c = httpclient.InferenceServerClient(url=family_server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(tiny_family_repo):
    """Direct ONNX Runtime on the model file: what the endpoint's logits must match."""
    folder = tiny_family_repo / "tiny"
    m = load_manifest(folder)
    sess = ort.InferenceSession(str(folder / m.onnx.file), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {m.onnx.input.name: x})[0]

    return m, run


def _tensor(n: int, crop: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, crop, crop)).astype(np.float32)


def test_health_and_metadata(triton, family_server):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("tiny")
    assert triton.is_model_ready("tiny2", model_version="1")
    assert not triton.is_model_ready("nope")
    meta = triton.get_model_metadata("tiny")
    sha = json.loads((family_server.plane.registry.entries["tiny"].folder / "manifest.json").read_text())["onnx"]["sha256"]
    assert meta["name"] == "tiny" and meta["versions"] == [sha[:12]] and meta["platform"] == "onnxruntime_onnx"
    assert triton.is_model_ready("tiny", model_version=sha[:12])  # the version follows the ONNX file
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert triton.get_model_metadata("tiny2")["inputs"][0]["shape"] == [-1, 3, 96, 96]
    server = triton.get_server_metadata()
    assert server["name"] == "effnet-serve" and "classification" in server["extensions"]
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("nope")
    assert e.value.status() == "404" and "unknown model" in e.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_fp32_tensor(triton, reference, binary):
    _, run = reference
    x = _tensor(2)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    res = triton.infer("tiny", [inp], outputs=[out], request_id="req-1")
    logits = res.as_numpy("logits")
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, run(x), rtol=1e-4, atol=1e-4)
    assert res.get_response()["id"] == "req-1" and res.get_response()["model_name"] == "tiny"


def test_infer_default_outputs_are_binary(triton, reference):
    """No `outputs`: tritonclient asks for binary_data_output, the binary tensor extension."""
    _, run = reference
    x = _tensor(1, seed=3)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = triton.infer("tiny", [inp])
    assert res.get_output("logits")["parameters"]["binary_data_size"] == 4000
    np.testing.assert_allclose(res.as_numpy("logits"), run(x), rtol=1e-4, atol=1e-4)


def test_infer_bytes_encoded_images(triton, reference):
    m, run = reference
    jpegs = [encode(photo((320, 240), seed=s)) for s in (0, 1)]
    inp = httpclient.InferInput("images", [2], "BYTES")
    inp.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
    res = triton.infer("tiny", [inp], outputs=[httpclient.InferRequestedOutput("logits")])
    expected = run(np.stack([prepare(j, m.preprocess, 50_000_000).tensor for j in jpegs]))
    np.testing.assert_allclose(res.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_class_count(triton, reference, binary):
    m, run = reference
    jpeg = encode(photo((200, 300), seed=2))
    inp = httpclient.InferInput("images", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[jpeg]], dtype=np.object_))
    out = httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)
    res = triton.infer("tiny", [inp], outputs=[out])
    top = res.as_numpy("logits")
    assert top.shape == (1, 3)
    parts = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in top[0]]
    logits = run(prepare(jpeg, m.preprocess, 50_000_000).tensor[None])[0]
    assert [int(p[1]) for p in parts] == np.argsort(-logits, kind="stable")[:3].tolist()
    scores = [float(p[0]) for p in parts]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert [p[2] for p in parts] == [m.labels[int(p[1])] for p in parts]


def test_infer_errors(triton):
    x = _tensor(1, crop=32)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        triton.infer("tiny", [inp])
    assert e.value.status() == "400" and "[N, 3, 64, 64]" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        triton.infer("nope", [inp])
    assert e.value.status() == "404"
    bad = httpclient.InferInput("images", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("tiny", [bad])
    assert e.value.status() == "400" and isinstance(e.value.message(), str)


def test_raw_http_json_variants(family_server, reference):
    """Nested JSON data, base64 BYTES in JSON, gzip bodies, and the error shape."""
    _, run = reference
    x = _tensor(1, seed=5)
    with httpx.Client(base_url=family_server.url, timeout=30) as c:
        body = {"inputs": [{"name": "images", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": x.tolist()}]}
        r = c.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == [1, 1000] and out["datatype"] == "FP32"
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(1, 1000), run(x), rtol=1e-4, atol=1e-4)

        jpeg = encode(photo(seed=7))
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(jpeg).decode()]}],
                "outputs": [{"name": "logits", "parameters": {"class_count": 2}}]}
        r = c.post("/v2/models/tiny/versions/1/infer", content=gzip.compress(json.dumps(body).encode()),
                   headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        strings = r.json()["outputs"][0]["data"]
        assert len(strings) == 2 and strings[0].count(":") >= 2

        plain = {"inputs": [{"name": "images", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": x.tolist()}]}
        every = c.post("/v2/models/tiny/infer", json={**plain, "outputs": []})  # none asked for: every output,
        assert every.status_code == 200, every.text  # as gRPC answers an empty list (KServe V2, Triton)
        assert every.json()["outputs"] == c.post("/v2/models/tiny/infer", json=plain).json()["outputs"]
        r = c.post("/v2/models/tiny/infer", json={**plain, "outputs": {}})
        assert r.status_code == 400 and r.json() == {"error": "'outputs' must be a list"}
        r = c.post("/v2/models/tiny/infer", content=b"{not json")
        assert r.status_code == 400 and isinstance(r.json()["error"], str)
        r = c.post("/v2/models/tiny/versions/7/infer", json=body)
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        r = c.get("/v2/models/tiny/bogus")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        r = c.put("/v2/models/tiny/infer", content=b"{}")  # a method the route does not have: Starlette's 405
        assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}, r.text
        r = c.get("/v2/nothing/here")
        assert r.status_code == 404 and r.json() == {"error": "no such endpoint: /v2/nothing/here"}, r.text
        assert c.get("/classify").json()["error"]["code"] == "method_not_allowed"  # the JSON API keeps its shape
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        metrics = c.get("/metrics").text
        assert 'effnet_requests_total{model="tiny",status="200"}' in metrics


def test_big_json_bodies_are_parsed_in_the_worker_process_with_the_same_answers(family_server, reference):
    """Above 256 kB of JSON the body is parsed in a worker process (app/api/v2/json_worker.py): the logits
    are the same as ONNX Runtime's, and a malformed big body still gets the protocol's 400."""
    _, run = reference
    x = _tensor(6, seed=11)
    body = json.dumps({"inputs": [{"name": "images", "shape": [6, 3, 64, 64], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    assert len(body) > 1 << 20
    with httpx.Client(base_url=family_server.url, timeout=60) as c:
        r = c.post("/v2/models/tiny/infer", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(6, 1000), run(x), rtol=1e-4, atol=1e-4)
        bad = body.replace(b'"shape": [6, 3, 64, 64]', b'"shape": [5, 3, 64, 64]')
        r = c.post("/v2/models/tiny/infer", content=bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "values in 'data' for shape" in r.json()["error"]
