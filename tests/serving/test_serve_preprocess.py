"""Decode and preprocess: odd inputs answered, hostile ones refused, and the result matches
torchvision's eval transform."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from app.errors import ImageError
from app.manifest import Preprocess
from app.preprocess import open_image, prepare, to_rgb
from serving_helpers import MEAN, STD, encode, photo

PP = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=MEAN, std=STD)
MAX_PIXELS = 50_000_000


def reference(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """torchvision: Resize(int) -> CenterCrop -> ToTensor -> Normalize, on a PIL image."""
    filt = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[pp.interpolation]
    w, h = img.size
    if w <= h:
        size = (pp.resize, int(pp.resize * h / w))
    else:
        size = (int(pp.resize * w / h), pp.resize)
    img = img.resize(size, filt)
    top = int(round((size[1] - pp.crop) / 2.0))
    left = int(round((size[0] - pp.crop) / 2.0))
    img = img.crop((left, top, left + pp.crop, top + pp.crop))
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.array(pp.mean, np.float32)) / np.array(pp.std, np.float32)
    return a.transpose(2, 0, 1)


# --- matches the reference ----------------------------------------------------------------
@pytest.mark.parametrize(
    "source,pp",
    [
        ("chelsea", PP),
        ("coffee", PP),
        ("chelsea", Preprocess(resize=64, crop=64, interpolation="bicubic", mean=MEAN, std=STD)),
        ("coffee", Preprocess(resize=320, crop=300, interpolation="bilinear", mean=MEAN, std=STD)),
        ("portrait", Preprocess(resize=36, crop=32, interpolation="nearest", mean=MEAN, std=STD)),
    ],
)
def test_matches_the_torchvision_eval_transform_without_draft(source, pp):
    img = {"chelsea": skdata.chelsea, "coffee": skdata.coffee}.get(source, lambda: np.asarray(photo((201, 333))))()
    png = encode(Image.fromarray(img), "PNG")
    ours = prepare(png, pp, MAX_PIXELS, draft=False).tensor
    ref = reference(Image.fromarray(img), pp)
    assert ours.shape == ref.shape == (3, pp.crop, pp.crop) and ours.dtype == np.float32
    assert float(np.abs(ours - ref).mean()) <= 0.01


def test_draft_decodes_big_jpegs_smaller_but_never_below_twice_the_target():
    big = encode(photo((1920, 1080)), quality=90)
    full = open_image(big, MAX_PIXELS, None)
    drafted = open_image(big, MAX_PIXELS, PP.resize)
    assert full.size == (1920, 1080)
    assert drafted.size == (960, 540)  # 1/2 scale: 1/4 would give 270 < 2 * 256
    small_target = open_image(big, MAX_PIXELS, 64)
    assert small_target.size == (240, 135)  # 1/8 is the JPEG limit; 135 >= 128
    d = prepare(big, PP, MAX_PIXELS, draft=True).tensor
    f = prepare(big, PP, MAX_PIXELS, draft=False).tensor
    assert float(np.abs(d - f).mean()) <= 0.02


def test_small_jpegs_are_not_drafted():
    assert open_image(encode(photo((400, 300))), MAX_PIXELS, PP.resize).size == (400, 300)


# --- odd but valid inputs -----------------------------------------------------------------
def _rgb_red_blue(w: int = 64, h: int = 32) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def _odd_inputs() -> dict[str, bytes]:
    base = photo((120, 90))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    p_trans = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_trans.info["transparency"] = 0
    frames = [Image.new("RGB", (50, 40), c) for c in ("red", "green", "blue")]
    anim = io.BytesIO()
    frames[0].save(anim, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sixteen = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    return {
        "cmyk_jpeg": encode(base.convert("CMYK"), "JPEG"),
        "grayscale_jpeg": encode(base.convert("L"), "JPEG"),
        "palette_gif": encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "palette_png_transparency": encode(p_trans, "PNG"),
        "animated_gif": anim.getvalue(),
        "rgba_png": encode(rgba, "PNG"),
        "la_png": encode(base.convert("LA"), "PNG"),
        "sixteen_bit_png": encode(sixteen, "PNG"),
        "int32_tiff": encode(base.convert("I"), "TIFF"),
        "float_tiff": encode(base.convert("F"), "TIFF"),
        "bilevel_png": encode(base.convert("1"), "PNG"),
        "webp": encode(base, "WEBP"),
        "bmp": encode(base, "BMP"),
        "one_pixel": encode(Image.new("RGB", (1, 1), "purple"), "PNG"),
        "strip_10000x10": encode(photo((10000, 10)), "PNG"),
        "strip_10x10000": encode(photo((10, 10000)), "JPEG"),
    }


ODD = _odd_inputs()


@pytest.mark.parametrize("name", sorted(ODD))
def test_every_odd_mode_and_shape_becomes_a_normalised_tensor(name):
    out = prepare(ODD[name], PP, MAX_PIXELS)
    assert out.tensor.shape == (3, 224, 224) and out.tensor.dtype == np.float32
    assert np.isfinite(out.tensor).all()
    lo = (0 - np.array(MEAN)) / np.array(STD)
    hi = (1 - np.array(MEAN)) / np.array(STD)
    per_channel = out.tensor.reshape(3, -1)
    assert (per_channel.min(axis=1) >= lo - 1e-4).all() and (per_channel.max(axis=1) <= hi + 1e-4).all()


def test_sixteen_bit_is_scaled_not_clipped():
    gray = np.full((20, 20), 128, np.uint8)
    img = open_image(encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), MAX_PIXELS)
    assert abs(int(np.asarray(img)[0, 0, 0]) - 128) <= 1  # Pillow's own conversion gives 255


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (10, 10), (0, 0, 0, 128))
    assert 120 <= np.asarray(to_rgb(half))[0, 0, 0] <= 135


def test_animated_gif_uses_the_first_frame():
    img = open_image(ODD["animated_gif"], MAX_PIXELS)
    r, g, b = np.asarray(img)[20, 25].tolist()
    assert r > 200 and g < 50 and b < 50


@pytest.mark.parametrize(
    "orientation,left,right",
    [
        (1, "red", "blue"),  # no rotation: landscape, red left
        (6, "top-red", "bottom-blue"),  # 90° clockwise needed: the red half ends up on top
        (8, "top-blue", "bottom-red"),  # 90° counter-clockwise: the blue half ends up on top
    ],
)
def test_exif_orientation_is_applied(orientation, left, right):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_rgb_red_blue(), "JPEG", exif=exif, quality=95)
    a = np.asarray(open_image(data, MAX_PIXELS)).astype(int)
    red = lambda px: px[0] > 200 and px[2] < 60  # noqa: E731
    blue = lambda px: px[2] > 200 and px[0] < 60  # noqa: E731
    if orientation == 1:
        assert a.shape[:2] == (32, 64)
        assert red(a[16, 5]) and blue(a[16, 58])
    else:
        assert a.shape[:2] == (64, 32)  # portrait now
        top, bottom = a[5, 16], a[58, 16]
        if orientation == 6:
            assert red(top) and blue(bottom)
        else:
            assert blue(top) and red(bottom)


# --- refused ------------------------------------------------------------------------------
def _png_claiming(w: int, h: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _real_png_bomb(side: int = 40000) -> bytes:
    """A genuine, valid 1-bit 40000x40000 all-black PNG: ~200 KB that would inflate to 1.6 Gpx."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + side // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_claiming(w: int, h: int) -> bytes:
    """A real small JPEG whose SOF0 header is rewritten to announce w x h."""
    data = bytearray(encode(photo((16, 16))))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _truncated(fmt: str) -> bytes:
    data = encode(photo((256, 256)), fmt)
    return data[: len(data) // 2]


REFUSED = {
    "empty": b"",
    "random": np.random.default_rng(0).bytes(4096),
    "text": b"hello, this is plain text and not an image\n" * 10,
    "html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "truncated_jpeg": _truncated("JPEG"),
    "truncated_png": _truncated("PNG"),
    "png_header_40000x40000": _png_claiming(40000, 40000),
    "jpeg_header_65500x65500": _jpeg_claiming(65500, 65500),
    "png_header_0x0": _png_claiming(0, 0),
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_or_broken_input_raises_image_error_only(name):
    with pytest.raises(ImageError) as exc:
        prepare(REFUSED[name], PP, MAX_PIXELS)
    assert exc.value.status == 400


def test_a_real_compressed_png_bomb_is_refused_before_decoding():
    bomb = _real_png_bomb()
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match="pixels"):
        prepare(bomb, PP, MAX_PIXELS)


def test_pixel_limit_is_ours_to_set():
    data = encode(photo((100, 100)), "PNG")
    prepare(data, PP, 10_000)
    with pytest.raises(ImageError, match="pixels"):
        prepare(data, PP, 9_999)


def test_mutated_real_image_bytes_never_raise_anything_but_image_error():
    """A small deterministic mutation campaign on the decode path (the fuzzing issue grows it)."""
    rng = np.random.default_rng(1)
    seeds = [encode(photo((64, 48)), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP")]
    tried = 0
    for seed in seeds:
        for _ in range(60):
            data = bytearray(seed)
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                data = data[: int(rng.integers(1, len(data)))]
            try:
                out = prepare(bytes(data), PP, MAX_PIXELS)
                assert out.tensor.shape == (3, 224, 224)
            except ImageError:
                pass
            tried += 1
    assert tried == 240
