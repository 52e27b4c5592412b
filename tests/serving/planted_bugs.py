"""Five wrong preprocessings, planted to prove the torchvision bound catches each one.

Each is the product's own path (app.engine.preprocess.open_image -> resize/crop -> normalise) with one
step done wrong, the way such a bug would really be written. Used only by
tests/serving/test_serve_preprocess.py; nothing here is product code.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from effnet_serve.engine.manifest import Preprocess
from effnet_serve.engine.preprocess import normalise, open_image, resize_crop


def _geometry(size: tuple[int, int], pp: Preprocess) -> tuple[int, int, int, int]:
    """torchvision's resized size and centre-crop offset: (new_w, new_h, left, top)."""
    w, h = size
    new_w, new_h = (pp.resize, int(pp.resize * h / w)) if w <= h else (int(pp.resize * w / h), pp.resize)
    return new_w, new_h, int(round((new_w - pp.crop) / 2.0)), int(round((new_h - pp.crop) / 2.0))


def _with_filter(img: Image.Image, pp: Preprocess, resample: Image.Resampling) -> np.ndarray:
    new_w, new_h, left, top = _geometry(img.size, pp)
    resized = img.resize((new_w, new_h), resample)
    return np.asarray(resized.crop((left, top, left + pp.crop, top + pp.crop)))


def lanczos(img: Image.Image, pp: Preprocess) -> np.ndarray:
    return _with_filter(img, pp, Image.Resampling.LANCZOS)


def bilinear(img: Image.Image, pp: Preprocess) -> np.ndarray:
    return _with_filter(img, pp, Image.Resampling.BILINEAR)


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The cubic convolution kernel Pillow's BICUBIC uses (a = -0.5)."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _taps_without_antialias(n_out: int, offset: int, in_size: int, scale: float) -> np.ndarray:
    """[n_out, in_size] weights: the cubic kernel at its fixed 4-tap support, whatever the scale.

    Pillow (and torchvision's antialias=True) stretch the kernel by the downscale factor so each
    output pixel averages every input pixel it covers; without that, a 3x downscale samples a
    third of the input and aliases. This is what torch's interpolate(antialias=False) computes.
    """
    weights = np.zeros((n_out, in_size))
    for i in range(n_out):
        centre = (offset + i + 0.5) * scale - 0.5
        first = math.floor(centre) - 1
        taps = np.arange(first, first + 4)
        w = _keys_cubic(taps - centre)
        np.add.at(weights[i], np.clip(taps, 0, in_size - 1), w)  # edge pixels repeat
        weights[i] /= weights[i].sum()
    return weights


def no_antialias(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Pillow's bicubic, its two passes and their rounding to 8 bits, minus the kernel stretching."""
    new_w, new_h, left, top = _geometry(img.size, pp)
    w, h = img.size
    cols = _taps_without_antialias(pp.crop, left, w, w / new_w)
    rows = _taps_without_antialias(pp.crop, top, h, h / new_h)
    a = np.asarray(img, np.float64)
    # Pillow's order: the horizontal pass, rounded to 8 bits, then the vertical one.
    horizontal = np.clip(np.rint(np.stack([a[:, :, c] @ cols.T for c in range(3)], axis=-1)), 0, 255)
    out = np.stack([rows @ horizontal[:, :, c] for c in range(3)], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def crop_shifted(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """The centre crop one pixel right of torchvision's, an off-by-one in the offset. Where the resized
    image is no wider than the crop, Pillow fills the missing column with black, as such a bug would."""
    new_w, new_h, left, top = _geometry(img.size, pp)
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left += 1
    return np.asarray(resized.crop((left, top, left + pp.crop, top + pp.crop)))


def bgr(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Right pixels, channels in OpenCV's order."""
    return np.asarray(resize_crop(img, pp))[:, :, ::-1]


BUGS = {"lanczos": lanczos, "bilinear": bilinear, "no_antialias": no_antialias,
        "crop_shift_1px": crop_shifted, "bgr": bgr}


def prepare_with(bug: str, data: bytes, pp: Preprocess, max_pixels: int, draft: bool = False) -> np.ndarray:
    """The served path with one planted bug: normalised float32 CHW. `draft`: decode a big JPEG at reduced
    scale first, as the server does by default (the bug is then in what follows the draft decode)."""
    crop = BUGS[bug](open_image(data, max_pixels, pp.resize if draft else None), pp)
    return normalise(Image.fromarray(np.ascontiguousarray(crop)), pp)
