"""End to end with Lite0's real ImageNet weights: real photos must get the right class."""

from __future__ import annotations

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from skimage import data as skdata

from effnet_serve.core.config import Settings
from effnet_serve.engine.manifest import load_manifest
from effnet_serve.engine.preprocess import prepare
from serving_helpers import encode, live_server

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def lite0(lite0_repo):
    with live_server(Settings(repository=lite0_repo, models=["lite0"])) as srv:
        yield srv


def classify(srv, data: bytes) -> dict:
    r = httpx.post(srv.url + "/classify", params={"model": "lite0", "top_k": 5}, content=data, headers={"content-type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_cat_photo_is_a_cat(lite0):
    body = classify(lite0, encode(Image.fromarray(skdata.chelsea()), quality=92))
    assert body["pretrained"] is True
    assert body["results"][0]["predictions"][0]["index"] in CATS, body["results"]


def test_a_coffee_photo_is_espresso_or_cup_and_multipart_agrees(lite0):
    data = encode(Image.fromarray(skdata.coffee()), quality=92)
    top5 = {p["index"] for p in classify(lite0, data)["results"][0]["predictions"]}
    assert top5 & COFFEE, top5
    r = httpx.post(
        lite0.url + "/classify", params={"model": "lite0"},
        files=[("file", ("c.jpg", data, "image/jpeg")), ("file", ("cat.png", encode(Image.fromarray(skdata.chelsea()), "PNG"), "image/png"))],
        timeout=60,
    )
    coffee, cat = (res["predictions"] for res in r.json()["results"])
    assert {p["index"] for p in coffee} & COFFEE and cat[0]["index"] in CATS


@pytest.mark.parametrize("photo", ["chelsea", "coffee", "astronaut", "rocket"])
def test_draft_decoding_of_a_big_jpeg_does_not_change_top1(lite0_repo, photo):
    """Upscaled real photos stand in for camera-size JPEGs, where draft decoding kicks in."""
    m = load_manifest(lite0_repo / "lite0")
    sess = ort.InferenceSession(str(lite0_repo / "lite0" / "model.onnx"), providers=["CPUExecutionProvider"])
    img = Image.fromarray(getattr(skdata, photo)())
    scale = 2400 / max(img.size)
    big = encode(img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS), quality=90)
    full = prepare(big, m.preprocess, 50_000_000, draft=False)
    drafted = prepare(big, m.preprocess, 50_000_000, draft=True)
    assert min(drafted.size) < min(full.size)  # the draft path really ran
    logits = sess.run(None, {"images": np.stack([full.tensor, drafted.tensor])})[0]
    assert int(np.argmax(logits[0])) == int(np.argmax(logits[1]))
