"""Uploads in every odd-but-valid mode, made from a real photo (chelsea), and the RGB picture each must be.

Shared by tests/serving/test_serve_preprocess.py and generate_preprocess_reference.py (which records
torchvision's eval transform of every expected picture in a venv with torchvision), so both sides build
the same files. PIL, NumPy and scikit-image only: nothing from the project, nothing from torch.

`build()` gives name -> (file bytes, how the same picture must look in RGB, from its own decoded pixels).
The expected pictures depend on Pillow's encoders; `digest()` fingerprints each one so the tests can tell
"the oracle was recorded on other pixels" (a Pillow upgrade: rerun the generator) from a wrong answer.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from skimage import data as skdata


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def real_picture(size: tuple[int, int] = (120, 80)) -> Image.Image:
    """A real photo (chelsea) at a small size, RGB."""
    return Image.fromarray(skdata.chelsea()).resize(size, Image.Resampling.LANCZOS)


def on_white(img: Image.Image) -> Image.Image:
    """What the server documents for transparency: composite on white."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def decoded(data: bytes) -> Image.Image:
    """The file as Pillow alone reads it (first frame), no conversion."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def expected(data: bytes, as_rgb: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """The RGB picture the server must make of this file."""
    return as_rgb(decoded(data))


def digest(img: Image.Image) -> str:
    """sha256 of an RGB picture's size and pixels."""
    assert img.mode == "RGB"
    return hashlib.sha256(b"%dx%d:" % img.size + img.tobytes()).hexdigest()


def build() -> dict[str, tuple[bytes, Callable[[Image.Image], Image.Image]]]:
    base = real_picture()
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    p_trans = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_trans.info["transparency"] = 0
    frames = [Image.new("RGB", (50, 40), c) for c in ("red", "green", "blue")]
    anim = io.BytesIO()
    frames[0].save(anim, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    gray = base.convert("L")
    sixteen = Image.fromarray(np.asarray(gray, np.uint16) * 257)
    unit_float = Image.fromarray(np.asarray(gray, np.float32) / 255.0)
    la = base.convert("LA")
    la.putalpha(Image.linear_gradient("L").rotate(90).resize(base.size))

    rgb = lambda im: im.convert("RGB")  # noqa: E731
    # Deep modes the server scales instead of clipping (Pillow's own convert clips 16-bit at 255).
    from_16 = lambda im: Image.fromarray(np.rint(np.asarray(im) / 257.0).astype(np.uint8)).convert("RGB")  # noqa: E731
    from_unit = lambda im: Image.fromarray(np.rint(np.asarray(im) * 255.0).astype(np.uint8)).convert("RGB")  # noqa: E731
    # Float pixels are rounded to the nearest level (Pillow's own F -> RGB truncates).
    from_float = lambda im: Image.fromarray(np.rint(np.asarray(im)).astype(np.uint8)).convert("RGB")  # noqa: E731
    return {
        "cmyk_jpeg": (encode(base.convert("CMYK"), "JPEG", quality=95), rgb),
        "grayscale_jpeg": (encode(gray, "JPEG", quality=95), rgb),
        "palette_gif": (encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"), rgb),
        "palette_png_transparency": (encode(p_trans, "PNG"), on_white),
        "animated_gif": (anim.getvalue(), rgb),
        "rgba_png": (encode(rgba, "PNG"), on_white),
        "la_png": (encode(la, "PNG"), on_white),
        "sixteen_bit_png": (encode(sixteen, "PNG"), from_16),
        "int32_tiff": (encode(base.convert("I"), "TIFF"), rgb),
        "float_tiff": (encode(base.convert("F"), "TIFF"), from_float),
        "unit_float_tiff": (encode(unit_float, "TIFF"), from_unit),
        "bilevel_png": (encode(base.convert("1"), "PNG"), rgb),
        "webp": (encode(base, "WEBP", quality=90), rgb),
        "webp_lossless_alpha": (encode(rgba, "WEBP", lossless=True), on_white),
        "bmp": (encode(base, "BMP"), rgb),
        "one_pixel": (encode(Image.new("RGB", (1, 1), "purple"), "PNG"), rgb),
        "strip_10000x10": (encode(real_picture((10000, 10)), "PNG"), rgb),
        "strip_10x10000": (encode(real_picture((10, 10000)), "JPEG"), rgb),
    }
