"""Confidence cascades: the decision, the live /classify?model=cascade path, and effnet eval --cascade."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from prerequisites import missing
from serving_helpers import encode, photo, queue_held

from app.policies.cascade import escalate, parse_cascade
from app.core.errors import BadRequest

JPEG_HEADERS = {"Content-Type": "image/jpeg"}


def test_decision_and_parsing():
    p = np.array([0.55, 0.3, 0.15], np.float32)
    assert escalate(p, 0.6) and not escalate(p, 0.55) and not escalate(p, 0.5)
    assert parse_cascade("cascade:b0, b4", []) == ["b0", "b4"]
    assert parse_cascade("cascade", ["lite0", "lite2"]) == ["lite0", "lite2"]
    for bad in ("cascade:b0", "cascade:b0,b0", "cascade:a,b,c,d,e"):
        with pytest.raises(BadRequest):
            parse_cascade(bad, [])
    with pytest.raises(BadRequest, match="EFFNET_DEFAULT_CASCADE"):
        parse_cascade("cascade", [])


def test_cascade_live(family_server):
    jpeg = encode(photo())
    with httpx.Client(base_url=family_server.url, timeout=30) as c:
        # threshold 1: every image is unsure -> escalated; random weights never reach p = 1.
        r = c.post("/classify?model=cascade:tiny,tiny2&threshold=1&top_k=3", content=jpeg, headers=JPEG_HEADERS)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "cascade:tiny,tiny2" and len(body["results"]) == 1
        res = body["results"][0]
        assert res["model"] == "tiny2" and len(res["predictions"]) == 3
        casc = res["cascade"]
        assert casc["path"] == ["tiny", "tiny2"] and casc["escalated"] is True and len(casc["top1_scores"]) == 2
        assert body["cascade"] == {"models": ["tiny", "tiny2"], "threshold": 1.0}
        assert r.headers["X-Effnet-Cascade-Path"] == "tiny,tiny2"
        # threshold 0: the cheap model's answer stands.
        r = c.post("/classify?model=cascade:tiny,tiny2&threshold=0", content=jpeg, headers=JPEG_HEADERS)
        res = r.json()["results"][0]
        assert res["cascade"]["path"] == ["tiny"] and res["model"] == "tiny" and r.headers["X-Effnet-Model"] == "tiny"
        assert res["cascade"]["top1_scores"][0] == pytest.approx(res["predictions"][0]["score"], abs=1e-6)
        # model=cascade: EFFNET_DEFAULT_CASCADE, EFFNET_CASCADE_THRESHOLD (0.6).
        r = c.post("/classify?model=cascade", content=jpeg, headers=JPEG_HEADERS)
        assert r.status_code == 200 and r.json()["cascade"]["models"] == ["tiny", "tiny2"]
        assert r.json()["cascade"]["threshold"] == 0.6
        # Multipart: each image decides on its own.
        files = [("file", ("a.jpg", jpeg, "image/jpeg")), ("file", ("b.png", encode(photo(seed=3), "PNG"), "image/png"))]
        r = c.post("/classify?model=cascade:tiny,tiny2&threshold=1", files=files)
        assert r.status_code == 200 and [len(res["cascade"]["path"]) for res in r.json()["results"]] == [2, 2]
        # Errors keep the service's shape.
        r = c.post("/classify?model=cascade:tiny,nope", content=jpeg, headers=JPEG_HEADERS)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
        r = c.post("/classify?model=cascade:tiny,tiny2&threshold=2", content=jpeg, headers=JPEG_HEADERS)
        assert r.status_code == 422
        r = c.post("/classify?model=cascade:tiny,tiny2", content=b"nope", headers=JPEG_HEADERS)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
        m = c.get("/metrics").text
        assert 'effnet_cascade_escalations_total{cascade="tiny,tiny2",from_model="tiny",to_model="tiny2"}' in m
        assert 'effnet_requests_total{model="tiny2",status="200"}' in m
    # Each stage fed the service-time statistics used by model=auto.
    assert len(family_server.plane.stats.fresh("tiny2")) >= 3


def test_a_cascade_is_refused_before_its_body_is_decoded_when_its_first_model_is_full(family_server):
    """The body is not an image: decoding it would answer 400. A full first model answers 503 first."""
    full = family_server.plane.settings.max_queue
    with httpx.Client(base_url=family_server.url, timeout=30) as c, queue_held(family_server, "tiny", full):
        r = c.post("/classify?model=cascade:tiny,tiny2", content=b"not an image at all", headers=JPEG_HEADERS)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from eval_photos import available, write_set

    found = available()
    if len(found) < 3:
        missing("scikit-image's sample photos", "scikit-image (test extra)")
    root = tmp_path_factory.mktemp("photos") / "folder"
    write_set(root, "folder", found)
    return root


def _eval(capsys, *args):
    from app.tools.eval_cli import main

    capsys.readouterr()
    rc = main(["eval", *map(str, args), "--json", "--quiet"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def test_eval_cascade_agrees_with_its_parts(capsys, tiny_family_repo, photo_dir, tmp_path):
    rc, d, err = _eval(capsys, "--cascade", "tiny,tiny2", "--threshold", "1", "--repo", tiny_family_repo,
                       "--data", photo_dir, "--no-write")
    assert rc == 0, err
    assert d["escalated_fraction"] == 1.0  # threshold 1: everything goes on, so the cascade is tiny2
    assert d["top1"] == d["models"]["tiny2"]["top1"]
    assert d["mean_macs"] == d["models"]["tiny"]["macs"] + d["models"]["tiny2"]["macs"]
    rc, d0, _ = _eval(capsys, "--cascade", "tiny,tiny2", "--threshold", "0", "--repo", tiny_family_repo,
                      "--data", photo_dir, "--no-write")
    assert d0["escalated_fraction"] == 0.0 and d0["top1"] == d0["models"]["tiny"]["top1"]
    assert d0["mean_macs"] == d0["models"]["tiny"]["macs"]
    assert d0["sweep"][0]["threshold"] == 0
    rc, _, err = _eval(capsys, "--model", "tiny", "--cascade", "tiny,tiny2", "--data", photo_dir)
    assert rc == 2 and "--cascade" in err


def _lite0_unsure(folder, photo_dir, threshold: float) -> int:
    """Photos whose top-1 probability is under the threshold, by ONNX Runtime on the served preprocessing."""
    import onnxruntime as ort

    from app.engine.manifest import load_manifest
    from app.engine.preprocess import prepare

    manifest = load_manifest(folder)
    session = ort.InferenceSession(str(folder / manifest.onnx.file), providers=["CPUExecutionProvider"])
    files = sorted(f for f in photo_dir.rglob("*") if f.is_file())
    assert len(files) == 5, files
    x = np.stack([prepare(f.read_bytes(), manifest.preprocess, 50_000_000).tensor for f in files])
    logits = session.run(None, {manifest.onnx.input.name: x})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return int((probs.max(axis=1) < threshold).sum())


def test_eval_cascade_lite0_lite2_real_weights(capsys, lite_cascade_repo, photo_dir, tmp_path):
    """The Lite0 -> Lite2 cascade on real photos, recorded for `effnet report`."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("lite0", "lite2"):
        (repo / name).symlink_to((lite_cascade_repo / name).resolve())
    rc, d, err = _eval(capsys, "--cascade", "lite0,lite2", "--threshold", "0.6", "--repo", repo, "--data", photo_dir)
    assert rc == 0, err
    assert d["size"] == 5 and d["pretrained"]
    # Counted here, straight from Lite0's softmax on each photo: how many are under the threshold.
    unsure = _lite0_unsure(lite_cascade_repo / "lite0", photo_dir, 0.6)
    assert d["escalated_fraction"] == pytest.approx(unsure / d["size"])
    macs0, macs2 = d["models"]["lite0"]["macs"], d["models"]["lite2"]["macs"]
    assert d["mean_macs"] == pytest.approx(macs0 + d["escalated_fraction"] * macs2, rel=1e-6)
    assert d["top5"] >= 60  # a correctly wired pair of ~75-78% models (see docs/accuracy.md)
    recorded = json.loads((repo / "cascades.json").read_text())
    assert recorded["lite0,lite2@0.6"]["escalated_fraction"] == d["escalated_fraction"]
    # effnet report puts the point beside the single models.
    from app.tools.report import write_report

    out = tmp_path / "docs"
    md = write_report(repo, out).read_text()
    assert "lite0 → lite2" in md and "cascade" in md.lower()
    shutil.rmtree(out)


def test_an_overloaded_later_model_keeps_the_earlier_answer_and_says_so(family_server):
    full = family_server.plane.settings.max_queue
    with httpx.Client(base_url=family_server.url, timeout=30) as c, queue_held(family_server, "tiny2", full):
        r = c.post("/classify?model=cascade:tiny,tiny2&threshold=1", content=encode(photo()), headers=JPEG_HEADERS)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["model"] == "tiny" and res["cascade"]["path"] == ["tiny"]
    assert res["cascade"]["escalation_skipped"].startswith("tiny2: ")
    assert r.headers["X-Effnet-Cascade-Degraded"] == "true"
