"""What every peer does the same way: read a model folder, preprocess one image, answer top-5.

Plain Pillow + NumPy, written as a user writes torchvision's eval transform by hand:
decode the whole image, resize its shorter side to `resize` with the manifest's filter,
centre-crop `crop` x `crop`, scale to [0, 1], normalise with mean/std, HWC -> CHW.
No draft decoding, no tricks. Deliberately independent of the product's `app/` code.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
           "nearest": Image.Resampling.NEAREST}


def load_model_dir(model_dir: str | Path) -> tuple[Path, dict]:
    """(path of model.onnx, manifest) of one model folder `models/<name>/`."""
    folder = Path(model_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest["onnx"]["file"], manifest


def preprocess(data: bytes, pp: dict) -> np.ndarray:
    """Encoded image bytes -> float32 [3, crop, crop], as the manifest's `preprocess` says."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    size, crop = pp["resize"], pp["crop"]
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((new_w, new_h), FILTERS[pp["interpolation"]])
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(pp["mean"], dtype=np.float32)) / np.asarray(pp["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def top5(logits: np.ndarray, labels: list[str]) -> dict:
    """One image's logits [1000] -> {"predictions": [{"index", "label", "score"}] x 5}, softmax scores."""
    e = np.exp(logits - logits.max())
    probs = e / e.sum()
    best = np.argsort(probs)[::-1][:5]
    return {"predictions": [{"index": int(i), "label": labels[i], "score": float(probs[i])} for i in best]}
