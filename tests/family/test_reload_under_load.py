"""A reload under load (EFFNET_MODEL_CONTROL=explicit): every request is answered, by one version, which it names.

Two builds of the same tiny EfficientNet from different seeds are the old and the new version of model `tiny`.
Clients keep classifying over /classify (multipart, two images), HTTP /v2 infer and gRPC ModelInfer (two FP32
rows each) while the new build replaces the old one's files and a load request swaps it in. Then:

* every request was answered 200;
* each answer names its version (`X-Effnet-Model-Version` on /classify, `model_version` on /v2 and gRPC): the
  first 12 hex digits of one of the two ONNX files' sha256, computed here from the files;
* every row of every answer is what that version computes for that input, per ONNX Runtime run here on the
  version's own file, and not what the other version computes: no request straddled the swap;
* the versions follow the order of events the test itself caused, which no timing can excuse:
  an answer received before the load was asked for is old; a request sent after the load answered is new;
  a request sent after any new answer was received is new (once the new version answers, the old one takes
  no new request); so each client, sending one request after another, sees old answers, then new ones.

Completion order across clients is not asserted: a request the old version had already taken finishes on it
(as it must), possibly after another client's request finished on the new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from raw_http import HeldUpload, close_all, multipart, png, until
from serving_helpers import live_server
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from effnet_serve.core.config import Settings

SEEDS = {"old": 11, "new": 12}
TINY = ["--width", "0.25", "--depth", "0.25", "--resolution", "64"]
CLIENTS_PER_KIND = 2
KINDS = ("classify", "v2", "grpc")
# Float32 rounding: ORT runs of other batch sizes and threads (relative to the logits' scale, which random weights
# put anywhere from 0.4 to 25), and the server's own order of operations in Normalize (1 ulp of the input, which
# the larger of the two builds here amplifies to 2e-6 in a probability). The versions differ far more (checked).
LOGIT_RTOL = 1e-5
PROB_TOL = 2e-5


def logit_tol(want: np.ndarray) -> float:
    return LOGIT_RTOL * max(1.0, float(np.abs(want).max()))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Version:
    digest: str
    run: object  # [n, 3, 64, 64] float32 -> [n, 1000] logits, by ONNX Runtime on this version's file


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def builds(tiny_repo: Path, effnet_build) -> dict[str, Path]:
    """The two versions, built once by the real build step and cached beside the other test repositories."""
    out = {}
    for which, seed in SEEDS.items():
        repo = tiny_repo.parent / f"reload-seed{seed}"
        effnet_build(repo, *TINY, "--name", "tiny", "--weights", "random", "--seed", str(seed))
        out[which] = repo / "tiny"
    return out


@pytest.fixture(scope="module")
def versions(builds) -> dict[str, Version]:
    out = {}
    for which, folder in builds.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        onnx_file = folder / manifest["onnx"]["file"]
        sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        name = manifest["onnx"]["input"]["name"]
        out[which] = Version(hashlib.sha256(onnx_file.read_bytes()).hexdigest()[:12],
                             lambda x, s=sess, n=name: s.run(None, {n: x})[0])
    assert out["old"].digest != out["new"].digest
    return out


def _preprocess(image: bytes, manifest: dict) -> np.ndarray:
    """The manifest's preprocessing for an image already at the resize size: centre crop, then ToTensor +
    Normalize, written out here (torchvision's rounding of the crop offset)."""
    pp = manifest["preprocess"]
    u8 = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    assert u8.shape[:2] == (pp["resize"], pp["resize"])  # so the resize step is the identity
    off = int(round((pp["resize"] - pp["crop"]) / 2.0))
    crop = u8[off:off + pp["crop"], off:off + pp["crop"]].astype(np.float32) / 255.0
    x = (crop - np.asarray(pp["mean"], np.float32)) / np.asarray(pp["std"], np.float32)
    return x.transpose(2, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(builds, versions):
    """Four images and four tensors, with what each version computes for each (one at a time)."""
    manifest = json.loads((builds["old"] / "manifest.json").read_text())
    assert manifest["preprocess"]["resize"] == 73 and manifest["preprocess"]["crop"] == 64
    images = [png((73, 73), seed=i) for i in range(4)]
    image_x = np.stack([_preprocess(b, manifest) for b in images])
    tensors = np.random.default_rng(7).standard_normal((4, 3, 64, 64)).astype(np.float32)
    expect = {}
    for which, v in versions.items():
        expect[which] = {
            "image": np.concatenate([v.run(image_x[i:i + 1]) for i in range(4)]),
            "tensor": np.concatenate([v.run(tensors[i:i + 1]) for i in range(4)]),
        }
    # The two versions must be told apart on every input, by far more than the tolerances: tensors by their
    # logits (/v2 and gRPC answer those), images by their probabilities (/classify answers those).
    for old, new in zip(expect["old"]["tensor"], expect["new"]["tensor"]):
        assert np.abs(old - new).max() > 100 * max(logit_tol(old), logit_tol(new))
    gap = np.abs(_softmax(expect["old"]["image"]) - _softmax(expect["new"]["image"])).max(axis=1)
    assert gap.min() > 100 * PROB_TOL, gap
    return images, tensors, expect


@dataclass
class Answer:
    client: int
    kind: str
    rows: tuple[int, int]  # which inputs, in order
    sent: float  # time.monotonic() just before sending
    received: float  # just after the whole answer was in
    status: int | None
    version: str | None = None
    values: np.ndarray | None = None  # [2, 1000]: logits (v2, grpc) or probabilities (classify)
    error: str | None = None


def _classify(http: httpx.Client, images: list[bytes], rows: tuple[int, int]):
    files = [("file", (f"{i}.png", images[i], "image/png")) for i in rows]
    r = http.post("/classify?model=tiny&top_k=1000", files=files)
    if r.status_code != 200:
        return r.status_code, None, None, r.text
    probs = np.zeros((2, 1000))
    for k, result in enumerate(r.json()["results"]):
        for p in result["predictions"]:
            probs[k, p["index"]] = p["score"]
    return 200, r.headers.get("x-effnet-model-version"), probs, None


def _v2(http: httpx.Client, x: np.ndarray):
    raw = x.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    r = http.post("/v2/models/tiny/infer", content=head + raw,
                  headers={"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))})
    if r.status_code != 200:
        return r.status_code, None, None, r.text
    n = int(r.headers["inference-header-content-length"])
    answer = json.loads(r.content[:n])
    return 200, answer["model_version"], np.frombuffer(r.content[n:], "<f4").reshape(2, 1000), None


def _grpc(stub, x: np.ndarray):
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    try:
        resp = stub.ModelInfer(req, timeout=120)
    except grpc.RpcError as exc:
        return None, None, None, f"{exc.code()}: {exc.details()}"
    return 200, resp.model_version, np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(2, 1000), None


def test_a_reload_under_load_answers_every_request_from_one_named_version_in_order(builds, versions, inputs, tmp_path):
    images, tensors, expect = inputs
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(builds["old"], repo / "tiny")
    settings = Settings(repository=repo, model_control="explicit", allow_open_control=True, default_model="tiny", threads=1, decode_workers=2,
                        device="cpu", grpc_port=free_port())
    answers: list[Answer] = []
    lock = threading.Lock()
    stop = threading.Event()

    with live_server(settings) as srv:
        target = f"127.0.0.1:{srv.app.state.grpc.port}"

        def client(n: int, kind: str) -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as http, grpc.insecure_channel(target) as ch:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
                i = 0
                while not stop.is_set():
                    rows = (i % 4, (i + 1 + n % 3) % 4)  # two different inputs
                    i += 1
                    sent = time.monotonic()
                    try:
                        if kind == "classify":
                            status, version, values, error = _classify(http, images, rows)
                        elif kind == "v2":
                            status, version, values, error = _v2(http, tensors[list(rows)])
                        else:
                            status, version, values, error = _grpc(stub, tensors[list(rows)])
                    except Exception as exc:  # noqa: BLE001 - a transport failure is an unanswered request
                        status, version, values, error = None, None, None, repr(exc)
                    with lock:
                        answers.append(Answer(n, kind, rows, sent, time.monotonic(), status, version, values, error))

        threads = [threading.Thread(target=client, args=(n, kind), daemon=True)
                   for n, kind in enumerate(k for k in KINDS for _ in range(CLIENTS_PER_KIND))]
        n_clients = len(threads)

        def answered_by_all(after: float) -> bool:
            with lock:
                return all(sum(1 for a in answers if a.client == c and a.sent > after) >= 2 for c in range(n_clients))

        try:
            for t in threads:
                t.start()
            until(lambda: answered_by_all(0.0), seconds=120, what="every client answered twice before the reload")

            # Requests caught on the old version across the swap, whatever the machine's speed: its inference
            # thread is held busy until the load has answered, so what it has taken by then waits for it.
            old_batcher = srv.plane.registry.entries["tiny"].batcher
            gate = threading.Event()
            old_batcher._executor.submit(gate.wait, 120)
            # And one request that looked its model up before the swap and asks for queue room after it: its
            # body is held half-sent until the load has answered.
            body, ctype = multipart(images[0], images[1])
            late_sent = time.monotonic()
            late = HeldUpload(srv.port, "/classify?model=tiny&top_k=1000", body, sent=len(body) // 2, content_type=ctype)
            try:
                until(lambda: old_batcher.room.used >= 4 and srv.plane.uploading >= 1,
                      what="two requests waiting on the old version, one still uploading")
                # The new build replaces the old files the way the build publishes a model (a rename into place).
                shutil.copytree(builds["new"], repo / ".staging-tiny")
                os.replace(repo / "tiny", repo / ".old-tiny")
                os.replace(repo / ".staging-tiny", repo / "tiny")
                with httpx.Client(base_url=srv.url, timeout=120) as http:
                    load_sent = time.monotonic()
                    r = http.post("/v2/repository/models/tiny/load")
                    load_done = time.monotonic()
                    assert r.status_code == 200, r.text
                    assert http.get("/v2/models/tiny").json()["versions"] == [versions["new"].digest]
            finally:
                gate.set()
            status, headers, content = late.finish(timeout=120)
            late_answer = Answer(-1, "classify", (0, 1), late_sent, time.monotonic(), status, None, None, content[:300])
            if status == 200:
                late_answer.version = headers.get("x-effnet-model-version")
                late_answer.values = np.zeros((2, 1000))
                for k, result in enumerate(json.loads(content)["results"]):
                    for p in result["predictions"]:
                        late_answer.values[k, p["index"]] = p["score"]

            until(lambda: answered_by_all(load_done), seconds=120, what="every client answered twice after the reload")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
            close_all()

    old, new = versions["old"].digest, versions["new"].digest
    # The half-sent request reached for queue room after the swap: the old version had stopped taking work, so
    # its successor answered (checked row by row with the others below).
    assert late_answer.status == 200 and late_answer.version == new, (late_answer.status, late_answer.error)
    during = [a for a in answers if a.sent < load_done and a.received > load_sent]
    print(f"{len(answers)} answers: {sum(a.version == old for a in answers)} old, {sum(a.version == new for a in answers)} "
          f"new; {len(during)} in flight during the {load_done - load_sent:.2f} s load, "
          f"{sum(a.version == new for a in during)} of them answered by the new version")
    failed = [a for a in answers if a.status != 200]
    assert not failed, [(a.kind, a.status, a.error) for a in failed[:5]]

    # Each answer names a version and every row of it is that version's output for that row's input.
    for a in [*answers, late_answer]:
        assert a.version in (old, new), (a.kind, a.version)
        which = "old" if a.version == old else "new"
        other = "new" if which == "old" else "old"
        table = "image" if a.kind == "classify" else "tensor"
        for k, row in enumerate(a.rows):
            if a.kind == "classify":
                want, alt, tol = _softmax(expect[which][table][row]), _softmax(expect[other][table][row]), PROB_TOL
            else:
                want, alt = expect[which][table][row], expect[other][table][row]
                tol = logit_tol(want)
            got = a.values[k]
            assert np.abs(got - want).max() <= tol, (a.kind, which, row, float(np.abs(got - want).max()))
            assert np.abs(got - alt).max() > 100 * tol, (a.kind, which, row)  # not the other version's

    # The order the test itself caused.
    assert {a.version for a in answers} == {old, new}
    assert all(a.version == old for a in answers if a.received < load_sent)
    assert all(a.version == new for a in answers if a.sent > load_done)
    first_new = min(a.received for a in answers if a.version == new)
    late_old = [a for a in answers if a.sent > first_new and a.version == old]
    assert not late_old, f"{len(late_old)} requests sent after a new answer arrived were answered by the old version"
    for c in range(n_clients):
        seen = [a.version for a in sorted(answers, key=lambda a: a.sent) if a.client == c]
        switch = seen.index(new)
        assert seen[:switch] == [old] * switch and seen[switch:] == [new] * (len(seen) - switch), (c, seen)
    # And it was a reload under load: the requests the old version held across the swap were answered by it.
    assert len([a for a in during if a.version == old and a.received > load_done]) >= 2
