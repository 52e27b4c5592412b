"""Bytes -> normalised CHW float32, exactly as the weights were evaluated.

The reference is torchvision's eval transform on a PIL image: Resize(shorter side, PIL
filter) -> CenterCrop -> ToTensor -> Normalize, and without draft the result equals it exactly
(tests/serving/test_serve_preprocess.py holds it to torchvision's own recorded output). One shortcut
keeps big JPEGs cheap:

* JPEGs much larger than the target are decoded in the DCT domain at 1/2, 1/4 or 1/8
  scale (`Image.draft`), but never below twice the target's shorter side, so the final
  antialiased bicubic still averages over enough pixels and top-1 does not move.

Every failure raises `ImageError` (-> 400); nothing else escapes `decode`.
"""

from __future__ import annotations

import io
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..core.errors import ImageError, OverBudget, PayloadTooLarge
from .manifest import Preprocess
from .memory import MemoryBudget

# Decode what browsers and cameras send; nothing that shells out (EPS -> Ghostscript) or
# parses documents (PDF). MPO is how Pillow names many phone JPEGs.
Image.init()  # register every plugin now, so the allow-list below can be checked against them
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF") if f in Image.OPEN)

# A truncated file is an error, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow warns above MAX_IMAGE_PIXELS and only raises above twice that: make the warning fatal
# too. (We also check the header size ourselves, so this is a second line of defence.)
warnings.simplefilter("error", Image.DecompressionBombWarning)

DRAFT_FACTOR = 2  # decoded shorter side stays >= DRAFT_FACTOR * resize

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def set_max_pixels(n: int) -> None:
    """Pillow's bomb guard is process-global; the server sets it from EFFNET_MAX_IMAGE_PIXELS."""
    Image.MAX_IMAGE_PIXELS = n


@dataclass
class Prepared:
    tensor: np.ndarray  # [3, crop, crop] float32
    decode_s: float
    preprocess_s: float
    size: tuple[int, int]  # decoded (w, h), after draft and EXIF rotation


# Bytes per decoded pixel by Pillow mode (unknown modes: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def decoded_bytes(img: Image.Image) -> int:
    """What decoding and converting this image will hold at its peak, from its header alone.

    The decoded frame, its RGB (or RGBA, for transparency) conversion and the EXIF-rotated copy can be alive
    at once: twice the decoded size plus 8 bytes a pixel covers them, for every mode.
    """
    w, h = img.size
    return w * h * (2 * _MODE_BYTES.get(img.mode, 4) + 8)


class PixelAllowance:
    """The pixels one request may still decode, across its images (EFFNET_MAX_REQUEST_PIXELS). The per-image cap
    alone lets a request of 64 small files ask for 64 x 50 megapixels: a 47 kB flat PNG declares 7000x7000 and
    costs 0.8 s of CPU to decode. Taken from the decode threads as each image's header is read, before any of
    its pixels are decoded (a JPEG counts at the reduced scale it is decoded at)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.left = limit, limit
        self._lock = threading.Lock()

    def take(self, img: Image.Image) -> None:
        w, h = img.size
        with self._lock:
            if w * h > self.left:
                raise PayloadTooLarge(f"the request's images decode to more than {self.limit} pixels together "
                                      "(EFFNET_MAX_REQUEST_PIXELS); send fewer or smaller images per request",
                                      limit_pixels=self.limit)
            self.left -= w * h


def open_image(data: bytes, max_pixels: int, target_short: int | None = None,
               before_decode: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """Decode to an RGB PIL image (first frame, EXIF orientation applied). `before_decode` sees the image
    once its header is read (size and mode known, draft applied) and before any pixel is decoded."""
    if not data:
        raise ImageError("the request body is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        # Refuse on the header's claim, before a single pixel is decoded.
        if w < 1 or h < 1 or w * h > max_pixels:
            raise ImageError(f"image is {w}x{h}; at most {max_pixels} pixels are accepted")
        if target_short and img.format in ("JPEG", "MPO"):
            scale = DRAFT_FACTOR * target_short / min(w, h)
            if scale < 0.5:  # draft can only halve, quarter or eighth
                img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        if before_decode is not None:
            before_decode(img)
        img.load()
    except (ImageError, OverBudget, PayloadTooLarge):
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image exceeds {max_pixels} pixels (decompression bomb guard)") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a supported image (JPEG, PNG, GIF, WebP, BMP, TIFF)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        if isinstance(exc, Image.DecompressionBombWarning):
            raise ImageError(f"image exceeds {max_pixels} pixels (decompression bomb guard)") from None
        raise ImageError("the image is corrupt or truncated") from None
    try:
        return to_rgb(_orient(img))
    except ImageError:
        raise
    except Exception:  # noqa: BLE001
        raise ImageError("the image could not be converted to RGB") from None


# round(v / 257) for every 16-bit value, as a table: converting a 50-megapixel 16-bit image costs one
# byte a pixel of output, not the float64 temporaries of arithmetic (8 bytes a pixel each).
_U16_TO_U8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def _orient(img: Image.Image) -> Image.Image:
    try:
        # in_place: without it Pillow returns a full copy even when there is nothing to rotate.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth refusing the photo over
        pass
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB.

    Transparency is composited on white, which is what a viewer shows for a logo or a
    cut-out on a page; dropping alpha instead exposes whatever colour the encoder left in
    fully transparent pixels (often black, sometimes garbage).
    High bit depths are scaled, not clipped: Pillow's own I;16 -> RGB clips at 255, which
    turns a 16-bit photo almost white.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img)
        # 16-bit PNGs arrive as I;16 or, from some encoders, I; a genuine 8-bit range stays as is.
        if mode.startswith("I;16") or a.max(initial=0) > 255:
            u8 = _U16_TO_U8[np.clip(a, 0, 65535).astype(np.uint16, copy=False)]
        else:
            u8 = np.clip(a, 0, 255).astype(np.uint8)
        return Image.fromarray(u8).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if a.max(initial=0) <= 1.0:  # float images are either [0, 1] or [0, 255]
            a *= 255.0
        np.rint(a, out=a)
        return Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info or mode in ("PA", "LA", "La", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def resize_crop(img: Image.Image, pp: Preprocess) -> Image.Image:
    """Shorter side -> pp.resize (torchvision's floor rounding), centre crop pp.crop, in one resize."""
    w, h = img.size
    if w <= h:
        new_w, new_h = pp.resize, int(pp.resize * h / w)
    else:
        new_w, new_h = int(pp.resize * w / h), pp.resize
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    # torchvision CenterCrop rounding.
    left = int(round((new_w - pp.crop) / 2.0))
    top = int(round((new_h - pp.crop) / 2.0))
    # The whole image, then the crop: resizing only the box that survives the crop is up to 2x faster but
    # rounds differently (up to 2 levels on a few pixels), and this must equal torchvision exactly.
    resized = img.resize((new_w, new_h), _FILTERS[pp.interpolation])
    return resized.crop((left, top, left + pp.crop, top + pp.crop))


def normalise(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """uint8 HWC -> normalised float32 CHW in one pass into one buffer.

    Transposing the uint8 view first and writing the product straight into the output saves
    three full-size float temporaries: 0.23 ms instead of 2.0 ms at 224 px, bit-identical.
    """
    std = np.asarray(pp.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
    offset = (np.asarray(pp.mean, dtype=np.float32) / std).astype(np.float32)[:, None, None]
    chw = np.asarray(img).transpose(2, 0, 1)  # a view: no copy
    out = np.empty(chw.shape, dtype=np.float32)
    np.multiply(chw, scale, out=out)
    out -= offset
    return out


def prepare(data: bytes, pp: Preprocess, max_pixels: int, *, draft: bool = True,
            budget: MemoryBudget | None = None, pixels: PixelAllowance | None = None) -> Prepared:
    """The whole path for one upload; runs in the decode thread pool. With a budget, the decoded image's
    memory is charged before any pixel is decoded (OverBudget when it does not fit) and given back after;
    with an allowance, its pixels are taken from the request's (PayloadTooLarge when they do not fit)."""
    charged = []

    def charge(img: Image.Image) -> None:
        if pixels is not None:
            pixels.take(img)
        if budget is not None:
            need = decoded_bytes(img)
            budget.take(need, "decoding a {}x{} image".format(*img.size))
            charged.append(need)

    t0 = time.perf_counter()
    try:
        img = open_image(data, max_pixels, pp.resize if draft else None, charge)
        t1 = time.perf_counter()
        try:
            tensor = normalise(resize_crop(img, pp), pp)
        except Exception:  # noqa: BLE001 - e.g. an extreme aspect ratio rounding a side to nothing
            raise ImageError("the image could not be resized") from None
        t2 = time.perf_counter()
        return Prepared(tensor, t1 - t0, t2 - t1, img.size)
    finally:
        if charged and budget is not None:
            budget.give(charged[0])
