"""Confidence cascades: the decision, the live /classify?model=cascade path, and effnet eval --cascade."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from prerequisites import missing
from serving_helpers import encode, photo, queue_held

from effnet_serve.policies.cascade import escalate, parse_cascade
from effnet_serve.core.errors import BadRequest

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


def _probs_direct(folder, images: list[bytes]) -> np.ndarray:
    """Softmax probabilities [n, 1000] by ONNX Runtime on the model file, on the served preprocessing."""
    import onnxruntime as ort

    from effnet_serve.engine.manifest import load_manifest
    from effnet_serve.engine.preprocess import prepare

    manifest = load_manifest(folder)
    session = ort.InferenceSession(str(folder / manifest.onnx.file), providers=["CPUExecutionProvider"])
    x = np.stack([prepare(data, manifest.preprocess, 50_000_000).tensor for data in images])
    logits = session.run(None, {manifest.onnx.input.name: x})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def _answer_of(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    best = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in best]


def _same_answer(predictions: list[dict], expected: list[tuple[int, float]]) -> None:
    assert [p["index"] for p in predictions] == [i for i, _ in expected]
    np.testing.assert_allclose([p["score"] for p in predictions], [s for _, s in expected], rtol=0, atol=1e-5)


def test_cascade_live(family_server, tiny_family_repo):
    jpeg = encode(photo())
    # What each stage says about this image, straight from its model file.
    p1, p2 = (_probs_direct(tiny_family_repo / name, [jpeg])[0] for name in ("tiny", "tiny2"))
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
        np.testing.assert_allclose(casc["top1_scores"], [p1.max(), p2.max()], rtol=0, atol=1e-5)
        _same_answer(res["predictions"], _answer_of(p2, 3))  # the answering stage's own answer
        assert body["cascade"] == {"models": ["tiny", "tiny2"], "threshold": 1.0}
        assert r.headers["X-Effnet-Cascade-Path"] == "tiny,tiny2"
        # threshold 0: the cheap model's answer stands.
        r = c.post("/classify?model=cascade:tiny,tiny2&threshold=0&top_k=3", content=jpeg, headers=JPEG_HEADERS)
        res = r.json()["results"][0]
        assert res["cascade"]["path"] == ["tiny"] and res["model"] == "tiny" and r.headers["X-Effnet-Model"] == "tiny"
        assert res["cascade"]["top1_scores"][0] == pytest.approx(res["predictions"][0]["score"], abs=1e-6)
        _same_answer(res["predictions"], _answer_of(p1, 3))
        # Either side of tiny's own top-1 probability: escalated exactly when it is under the threshold.
        for threshold, escalated in ((p1.max() * 1.05, True), (p1.max() * 0.95, False)):
            r = c.post(f"/classify?model=cascade:tiny,tiny2&threshold={threshold:.9f}&top_k=3", content=jpeg,
                       headers=JPEG_HEADERS)
            res = r.json()["results"][0]
            assert res["cascade"]["escalated"] is escalated, (threshold, res["cascade"])
            assert res["model"] == ("tiny2" if escalated else "tiny")
            _same_answer(res["predictions"], _answer_of(p2 if escalated else p1, 3))
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
    from effnet_serve.tools.eval_cli import main

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


def test_eval_cascade_lite0_lite2_real_weights(capsys, lite_cascade_repo, photo_dir, tmp_path):
    """The Lite0 -> Lite2 cascade on real photos, replayed here from each model's own answers (ONNX Runtime
    on its file) at every threshold of the sweep, then recorded for `effnet report`."""
    import csv
    import shutil

    from eval_photos import WNIDS

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("lite0", "lite2"):
        (repo / name).symlink_to((lite_cascade_repo / name).resolve())
    files = sorted(f for f in photo_dir.rglob("*") if f.is_file())
    p0, p2 = (_probs_direct(lite_cascade_repo / name, [f.read_bytes() for f in files]) for name in ("lite0", "lite2"))
    conf0, top1_0, top1_2 = p0.max(axis=1), p0.argmax(axis=1), p2.argmax(axis=1)

    def check(d: dict, labels: list[int]) -> None:
        macs0, macs2 = d["models"]["lite0"]["macs"], d["models"]["lite2"]["macs"]
        assert d["size"] == len(files) >= 3
        sweep = {row["threshold"]: row for row in d["sweep"]}
        assert set(sweep) >= {0.3, 0.5, 0.6, 0.9}
        for threshold, row in [(0.6, d), *sweep.items()]:
            # No photo sits so close to a threshold that float noise could decide its side.
            assert np.abs(conf0 - threshold).min() > 1e-4, threshold
            unsure = conf0 < threshold  # escalated exactly when Lite0's top-1 probability is under it
            answers = [np.argsort(-(p2[i] if unsure[i] else p0[i]), kind="stable")[:5] for i in range(len(files))]
            want = {"top1_correct": sum(int(a[0] == y) for a, y in zip(answers, labels)),
                    "top5_correct": sum(int(y in a) for a, y in zip(answers, labels)),
                    "escalated_fraction": pytest.approx(unsure.mean(), abs=1e-4),
                    "mean_macs": pytest.approx(macs0 + unsure.mean() * macs2, abs=1)}
            assert {k: row[k] for k in want} == want, threshold
        for name, p in (("lite0", p0), ("lite2", p2)):  # the single models on the same photos
            top1 = sum(int(np.argmax(p[i]) == y) for i, y in enumerate(labels))
            assert d["models"][name]["top1"] == pytest.approx(100.0 * top1 / len(files), abs=0.01)

    # The hand labels: what the cascade scores on the photos, recorded in cascades.json.
    rc, d, err = _eval(capsys, "--cascade", "lite0,lite2", "--threshold", "0.6", "--repo", repo, "--data", photo_dir)
    assert rc == 0, err
    assert d["pretrained"] and 0 < d["escalated_fraction"] < 1  # on these photos the 0.6 cascade takes both paths
    check(d, [WNIDS.index(f.parent.name) for f in files])  # the folder layout: <wnid>/<file>

    # Five photos' counts cannot tell which stage answered (Lite0 and Lite2 get different photos right, the
    # same number). Labelled with one stage's own top-1, they can: each photo counts exactly when the
    # cascade gave that stage's answer, so every photo's answer is checked at every threshold.
    assert any(top1_0[i] != top1_2[i] for i in np.flatnonzero(conf0 < 0.6))
    for stage, stage_top1 in (("lite0", top1_0), ("lite2", top1_2)):
        own = tmp_path / f"labelled-by-{stage}"
        own.mkdir()
        with (own / "labels.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for src, label in zip(files, stage_top1):
                shutil.copyfile(src, own / src.name)
                w.writerow([src.name, int(label)])
        rc, d, err = _eval(capsys, "--cascade", "lite0,lite2", "--threshold", "0.6", "--repo", repo, "--data", own,
                           "--no-write")
        assert rc == 0, err
        check(d, [int(x) for x in stage_top1])

    recorded = json.loads((repo / "cascades.json").read_text())
    assert list(recorded) == ["lite0,lite2@0.6"] and recorded["lite0,lite2@0.6"]["dataset"] == photo_dir.name
    # effnet report puts the point beside the single models.
    from effnet_serve.tools.report import write_report

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
