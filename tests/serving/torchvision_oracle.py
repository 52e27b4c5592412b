"""torchvision's eval transform on real photos, as recorded by tests/data/generate_preprocess_reference.py.

The outside oracle for app/engine/preprocess.py: the uint8 crops torchvision's Resize + CenterCrop made
(in a venv with torchvision), normalised here exactly as ToTensor + Normalize do, and checked
against the rows torchvision itself normalised. Nothing here imports the code under test.

Three kinds of record: each photo fully decoded (`Entry.draft` None); the big JPEGs also as the server
decodes them by default, at libjpeg's 1/`draft` scale (`Entry.draft`, `Entry.decoded_size`); and the
odd-mode uploads of tests/data/odd_inputs.py (`odd_reference`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data"
INDEX = DATA / "preprocess_reference.json"
ARRAYS = DATA / "preprocess_reference.npz"
RECIPES = DATA / "torchvision_recipes.json"

MEAN_BOUND = 1e-3  # mean |ours - torchvision| over the tensor, normalised units

if str(DATA) not in sys.path:  # odd_inputs lives with the fixture its generator writes
    sys.path.insert(0, str(DATA))
import odd_inputs  # noqa: E402


@dataclass(frozen=True)
class Entry:
    photo: str
    model: str
    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_key: str
    rows_key: str
    draft: int | None = None  # recorded on the JPEG decoded at 1/draft scale (the server's draft path)
    decoded_size: tuple[int, int] | None = None  # that decode's size

    @property
    def id(self) -> str:
        return f"{self.photo}@{self.model}" + (f"/draft{self.draft}" if self.draft else "")


@functools.cache
def index() -> dict:
    return json.loads(INDEX.read_text())


@functools.cache
def _arrays():
    return np.load(ARRAYS)


def entries() -> list[Entry]:
    return [
        Entry(e["photo"], e["model"], e["resize"], e["crop"], e["interpolation"], tuple(e["mean"]), tuple(e["std"]),
              e["crop_key"], e["rows_key"], e.get("draft"), tuple(e["decoded_size"]) if "decoded_size" in e else None)
        for e in index()["entries"]
    ]


def photo_path(package: str, file: str) -> Path:
    if package == "scikit-image":
        import skimage

        return Path(skimage.__file__).parent / "data" / file
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / file
    raise ValueError(package)


@functools.cache
def photo_bytes(photo: str) -> bytes:
    """The photo file exactly as the generator read it (same package file, same sha256)."""
    meta = index()["photos"][photo]
    data = photo_path(meta["package"], meta["file"]).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == meta["sha256"], f"{meta['file']} from {meta['package']} is not the photo the oracle recorded"
    return data


def _crop(key: str, crop: int) -> np.ndarray:
    with Image.open(io.BytesIO(_arrays()[key].tobytes())) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape == (crop, crop, 3)
    return a


def torchvision_crop(entry: Entry) -> np.ndarray:
    """torchvision's Resize + CenterCrop output, uint8 [crop, crop, 3]."""
    return _crop(entry.crop_key, entry.crop)


def normalise(crop: np.ndarray, mean, std) -> np.ndarray:
    """ToTensor + Normalize, in torchvision's order and precision: float32 x / 255, then (x - mean) / std."""
    x = crop.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def torchvision_rows(entry: Entry) -> np.ndarray:
    """torchvision's own normalised first and last rows, float32 [3, 2, crop]."""
    return _arrays()[entry.rows_key]


def reference(entry: Entry) -> np.ndarray:
    """torchvision's eval transform of the photo, normalised float32 CHW."""
    return normalise(torchvision_crop(entry), entry.mean, entry.std)


def recipes() -> dict[str, dict]:
    """torchvision's IMAGENET1K_V1 metadata for b0..b7 (eval transform, accuracy, params, dropout)."""
    return json.loads(RECIPES.read_text())["models"]


def odd_reference(name: str, picture: Image.Image, mean, std) -> np.ndarray:
    """torchvision's eval transform of the RGB picture the odd-mode upload `name` must become, normalised
    float32 CHW. Refuses a picture other than the one recorded (Pillow encodes the uploads: after an upgrade
    that changes them, rerun tests/data/generate_preprocess_reference.py)."""
    rec = index()["odd_inputs"][name]
    assert odd_inputs.digest(picture) == rec["digest"], (
        f"{name}: the picture differs from the one torchvision was recorded on (Pillow {index()['pillow']}); "
        "rerun tests/data/generate_preprocess_reference.py")
    return normalise(_crop(rec["crop_key"], rec["crop"]), mean, std)
