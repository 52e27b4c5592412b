"""Faults: broken models are disabled alone, and a model that fails at run time fails only
its own batch - on a real `effnet serve` process with real ONNX Runtime sessions.

The repository holds the two good `tiny` EfficientNets and, next to them, copies damaged
in every way the issue names (and a few more): a corrupt and a truncated model.onnx, a
manifest whose checksum is wrong, a valid ONNX file that is not the one the manifest
describes, a missing file, a manifest that points outside its folder, a model whose
warm-up fails, and `poison`, a small valid graph that loads and warms up but fails inside
ORT at run time whenever an image is bright (its Gather index comes from the pixels and
runs out of bounds) - no monkeypatching, the failure is ORT's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from reliability_helpers import (
    JPEG,
    ServerProcess,
    check_error,
    encode,
    leaks,
    real_photo,
    record,
    solid,
)
from serving_helpers import manifest_for

GOOD = ("tiny", "tiny2")
PHOTO = encode(real_photo((200, 133)), "JPEG")
WHITE, GRAY = solid(255), solid(128)  # normalised maxima ~2.6 (poison) and ~0.4 (fine)


def _graph_model(crop: int, nodes: list, initializers: list) -> bytes:
    graph = helper.make_graph(
        nodes, "fault",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def poison_onnx(crop: int = 32) -> bytes:
    """Mean colour -> linear -> logits, plus Gather(zeros[2], int(max pixel)): any image whose
    normalised maximum reaches 2 (a white one) indexes out of bounds and ORT fails the run."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32), "W")
    z = numpy_helper.from_array(np.zeros(2, np.float32), "Z")
    return _graph_model(crop, [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("ReduceMax", ["images"], ["mx"], keepdims=0),
        helper.make_node("Cast", ["mx"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["Z", "idx"], ["zero"]),
        helper.make_node("Add", ["mm", "zero"], ["logits"]),
    ], [w, z])


def batch1_only_onnx(crop: int = 32) -> bytes:
    """Reshapes to a fixed batch of 1: loads fine, and the warm-up at batch 2 fails inside ORT."""
    w = numpy_helper.from_array(np.zeros((3, 1000), np.float32), "W")
    shape = numpy_helper.from_array(np.array([1, 3], np.int64), "S")
    return _graph_model(crop, [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "S"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["logits"]),
    ], [w, shape])


def _write(repo: Path, name: str, onnx_bytes: bytes, crop: int = 32) -> Path:
    folder = repo / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_bytes)
    (folder / "manifest.json").write_text(json.dumps(manifest_for(name, onnx_bytes, crop, crop + 4)))
    return folder


def _copy_tiny(src: Path, repo: Path, name: str) -> Path:
    folder = repo / name
    shutil.copytree(src / "tiny", folder)
    _edit_manifest(folder, name=name)
    return folder


def _edit_manifest(folder: Path, **changes) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    for key, value in changes.items():
        if key == "onnx_sha256":
            m["onnx"]["sha256"] = value
        elif key == "onnx_file":
            m["onnx"]["file"] = value
        else:
            m[key] = value
    (folder / "manifest.json").write_text(json.dumps(m))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# name -> (what was done, a word the reason must contain)
FAULTS = {
    "corrupt-onnx": ("model.onnx overwritten with random bytes, manifest checksum updated to match", "onnxruntime"),
    "truncated-onnx": ("model.onnx cut in half, manifest checksum updated to match", "onnxruntime"),
    "truncated-stale-sum": ("model.onnx cut in half, manifest left as built", "sha256"),
    "bad-checksum": ("manifest onnx.sha256 set to another digest", "sha256"),
    "swapped-onnx": ("a valid, loadable ONNX (tiny2's) in place of the one the manifest describes", "sha256"),
    "missing-onnx": ("model.onnx deleted", "missing"),
    "manifest-not-json": ("manifest.json is not JSON", "manifest.json"),
    "manifest-escapes": ("manifest onnx.file = ../tiny/model.onnx (a path out of its folder)", "onnx.file"),
    "missing-folder": ("EFFNET_MODELS names a model the repository lacks", "no folder"),
    "warmup-fails": ("valid graph that only runs at batch 1; warm-up at batch 2 fails in ORT", "warm-up"),
}


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("faults") / "repo"
    repo.mkdir()
    for name in GOOD:
        shutil.copytree(tiny_repo / name, repo / name)
    onnx_bytes = (tiny_repo / "tiny" / "model.onnx").read_bytes()
    half = onnx_bytes[: len(onnx_bytes) // 2]
    garbage = np.random.default_rng(0).bytes(4096)

    f = _copy_tiny(tiny_repo, repo, "corrupt-onnx")
    (f / "model.onnx").write_bytes(garbage)
    _edit_manifest(f, onnx_sha256=_sha(garbage))
    f = _copy_tiny(tiny_repo, repo, "truncated-onnx")
    (f / "model.onnx").write_bytes(half)
    _edit_manifest(f, onnx_sha256=_sha(half))
    f = _copy_tiny(tiny_repo, repo, "truncated-stale-sum")
    (f / "model.onnx").write_bytes(half)
    f = _copy_tiny(tiny_repo, repo, "bad-checksum")
    _edit_manifest(f, onnx_sha256=_sha(b"something else"))
    f = _copy_tiny(tiny_repo, repo, "swapped-onnx")
    shutil.copyfile(tiny_repo / "tiny2" / "model.onnx", f / "model.onnx")
    f = _copy_tiny(tiny_repo, repo, "missing-onnx")
    (f / "model.onnx").unlink()
    f = _copy_tiny(tiny_repo, repo, "manifest-not-json")
    (f / "manifest.json").write_text("{not json")
    f = _copy_tiny(tiny_repo, repo, "manifest-escapes")
    _edit_manifest(f, onnx_file="../tiny/model.onnx")
    _write(repo, "warmup-fails", batch1_only_onnx())
    _write(repo, "poison", poison_onnx())
    return repo


@pytest.fixture(scope="module")
def srv(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    names = [*GOOD, "poison", *FAULTS]
    env = {
        "EFFNET_REPOSITORY": str(repo), "EFFNET_MODELS": ",".join(names), "EFFNET_DEFAULT_MODEL": "tiny",
        "EFFNET_MAX_BATCH_POISON": "1",  # one request per batch: "only that batch" is then "only that request"
        "EFFNET_MAX_DELAY_MS": "20",
    }
    server = ServerProcess(env, tmp_path_factory.mktemp("faults-log") / "server.log").start()
    yield server
    server.stop()


def test_each_broken_model_is_disabled_alone_with_its_reason_and_the_others_serve(srv: ServerProcess):
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        listing = c.get("/models")
        by_name = {m["name"]: m for m in listing.json()["models"]}
        ready = c.get("/health/ready")
        not_ready = check_error(ready.status_code, ready.headers, ready.content)["models"]
        answers = {name: c.post("/classify", params={"model": name}, content=PHOTO, headers=JPEG) for name in by_name}

    for name, (fault, word) in FAULTS.items():
        entry = by_name[name]
        ok = (entry["status"] == "unavailable" and word in (entry["reason"] or "") and name in not_ready
              and answers[name].status_code == 503)
        record("faults", fault=name, injected=fault, reason=entry["reason"], outcome="disabled alone" if ok else "WRONG")
        assert entry["status"] == "unavailable" and entry["provider"] is None, entry
        assert word in entry["reason"], (name, entry["reason"])
        assert not_ready[name] == entry["reason"]  # /health/ready says which, and why
        err = check_error(answers[name].status_code, answers[name].headers, answers[name].content)
        assert answers[name].status_code == 503 and err["code"] == "model_unavailable" and err["reason"] == entry["reason"]
        assert int(answers[name].headers["retry-after"]) >= 1
    assert ready.status_code == 503 and set(not_ready) == set(FAULTS)
    assert not leaks(listing.text), leaks(listing.text)  # reasons name the problem, not Python's exception classes
    for name in (*GOOD, "poison"):
        assert by_name[name]["status"] == "ready", by_name[name]
    for name in GOOD:
        assert answers[name].status_code == 200 and answers[name].json()["model"] == name


def test_a_model_failing_inside_onnxruntime_fails_only_its_own_requests(srv: ServerProcess):
    async def mixed() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            jobs = []
            for i in range(12):
                image = WHITE if i % 2 == 0 else GRAY
                jobs.append(("white" if image is WHITE else "gray",
                             c.post("/classify", params={"model": "poison"}, content=image, headers={"content-type": "image/png"})))
            jobs += [("tiny", c.post("/classify", params={"model": "tiny"}, content=PHOTO, headers=JPEG)) for _ in range(6)]
            responses = await asyncio.gather(*(j for _, j in jobs))
            return [(kind, r) for (kind, _), r in zip(jobs, responses)]

    results = asyncio.run(mixed())
    for kind, r in results:
        if kind == "white":
            err = check_error(r.status_code, r.headers, r.content)
            assert r.status_code == 503 and err["code"] == "inference_failed", r.text
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.status_code == 200, (kind, r.text)
    failed = sum(r.status_code == 503 for _, r in results)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        again = c.post("/classify", params={"model": "poison"}, content=GRAY, headers={"content-type": "image/png"})
        metrics = c.get("/metrics").text
    assert again.status_code == 200  # the model itself is still in service
    assert srv.alive(), srv.log()
    assert 'effnet_requests_rejected_total{model="poison",reason="inference_error"} 6.0' in metrics
    record("faults", fault="poison", injected="ORT fails at run time on bright images (Gather index out of bounds); "
           "12 concurrent requests to it (6 bright, 6 gray) and 6 to tiny, one image per batch",
           reason=None, outcome=f"{failed} of {len(results)} requests 503 inference_failed, exactly the bright ones; "
           "the gray ones, tiny and the process unaffected; the model serves again right after")
