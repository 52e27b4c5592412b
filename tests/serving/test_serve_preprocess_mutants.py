"""Preprocessing corners that the torchvision oracle does not reach, each added for a mutant that
survived `make mutation` (docs/testing.md): the bilinear and nearest recipes, the smallest recipe a
manifest allows, the stage timings, and a conversion failure.

The expected sizes and boxes are worked out here by hand from torchvision's rules (shorter side to
`resize` with floor rounding, CenterCrop's round((size - crop) / 2)), not taken from the code under test.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import effnet_serve.engine.preprocess as preprocess
from effnet_serve.core.errors import ImageError
from effnet_serve.engine.manifest import Preprocess
from effnet_serve.engine.preprocess import open_image, prepare, resize_crop
from serving_helpers import MEAN, STD, encode

MAX_PIXELS = 50_000_000


def chelsea() -> Image.Image:
    img = Image.fromarray(skdata.chelsea())  # 451 x 300, RGB
    assert img.size == (451, 300)
    return img


@pytest.mark.parametrize("name,pil", [("bilinear", Image.Resampling.BILINEAR), ("nearest", Image.Resampling.NEAREST)])
def test_bilinear_and_nearest_recipes_resize_with_their_own_pil_filter(name, pil):
    """torchvision's Resize(256, interpolation) on a PIL image is PIL's resize with that filter."""
    img = chelsea()
    pp = Preprocess(resize=256, crop=224, interpolation=name, mean=MEAN, std=STD)
    # 451x300 -> shorter side 256: (int(256 * 451 / 300), 256) = (384, 256); centre crop 224 at (80, 16).
    want = np.asarray(img.resize((384, 256), pil).crop((80, 16, 304, 240)))
    got = np.asarray(resize_crop(img, pp))
    np.testing.assert_array_equal(got, want)
    # ... and it is not the bicubic result (which is what a lost or default filter gives).
    bicubic = np.asarray(resize_crop(img, pp.model_copy(update={"interpolation": "bicubic"})))
    assert np.abs(got.astype(int) - bicubic).mean() > 0.5


@pytest.mark.parametrize("split", ["left_right", "top_bottom"])
def test_the_smallest_recipe_shrinks_a_picture_to_its_mean(split):
    """resize=1, crop=1 (the least a manifest allows): a 2x2 half-black, half-white square becomes one
    grey pixel, whichever way it is split. Any other intermediate size would keep one half's colour."""
    a = np.zeros((2, 2, 3), np.uint8)
    if split == "left_right":
        a[:, 1] = 255
    else:
        a[1, :] = 255
    pp = Preprocess(resize=1, crop=1, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = np.asarray(resize_crop(Image.fromarray(a), pp))
    assert out.shape == (1, 1, 3)
    assert np.all(np.abs(out.astype(int) - 127.5) <= 1), out
    tensor = prepare(encode(Image.fromarray(a), "PNG"), pp, MAX_PIXELS).tensor
    assert tensor.shape == (3, 1, 1) and np.all(np.abs(tensor) <= 1.0 / (255 * 0.5) + 1e-6), tensor


def test_stage_timings_are_durations_inside_the_call():
    """decode_s and preprocess_s are what timing_ms reports: each a part of the call's own wall time."""
    data = encode(chelsea(), "JPEG", quality=90)
    pp = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=MEAN, std=STD)
    t0 = time.perf_counter()
    out = prepare(data, pp, MAX_PIXELS)
    elapsed = time.perf_counter() - t0
    assert 0 < out.decode_s <= elapsed
    assert 0 < out.preprocess_s <= elapsed
    assert out.decode_s + out.preprocess_s <= elapsed


def test_a_failing_conversion_is_a_400_that_says_so(monkeypatch):
    """Nothing but ImageError leaves decoding, and the client is told which step failed."""

    def broken(img):
        raise ValueError("simulated: a mode Pillow cannot convert")

    monkeypatch.setattr(preprocess, "to_rgb", broken)
    with pytest.raises(ImageError, match="^the image could not be converted to RGB$") as exc:
        open_image(encode(chelsea(), "PNG"), MAX_PIXELS)
    assert exc.value.status == 400


def test_set_max_pixels_is_the_guard_pillow_applies(monkeypatch):
    """The server hands EFFNET_MAX_IMAGE_PIXELS to Pillow too: Pillow refuses a file over twice that even
    when our own header check would let it through."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    data = encode(Image.new("RGB", (200, 150), "teal"), "PNG")  # 30000 pixels
    preprocess.set_max_pixels(10_000)
    assert Image.MAX_IMAGE_PIXELS == 10_000
    with pytest.raises(ImageError, match="decompression bomb guard"):
        open_image(data, MAX_PIXELS)
    preprocess.set_max_pixels(30_000)
    assert open_image(data, MAX_PIXELS).size == (200, 150)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_decoded_bytes_is_twice_the_decoded_frame_plus_8_bytes_a_pixel(mode):
    """The memory budget's charge (docstring of decoded_bytes), with the frame's size as Pillow holds it."""
    img = Image.new(mode, (37, 11))
    frame = len(img.tobytes())  # Pillow's own bytes for this mode
    assert preprocess.decoded_bytes(img) == 2 * frame + 8 * 37 * 11


def test_prepare_drafts_big_jpegs_by_default():
    """The server calls prepare() without `draft`: the fast DCT-scaled decode is the default."""
    from serving_helpers import photo

    big = encode(photo((1920, 1080)), quality=90)
    pp = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=MEAN, std=STD)
    assert prepare(big, pp, MAX_PIXELS).size == (960, 540)
    assert prepare(big, pp, MAX_PIXELS, draft=False).size == (1920, 1080)


def test_a_decode_over_the_memory_budget_says_what_it_was_refused():
    from effnet_serve.core.errors import OverBudget
    from effnet_serve.engine.memory import MemoryBudget

    pp = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=MEAN, std=STD)
    with pytest.raises(OverBudget) as exc:
        prepare(encode(chelsea(), "PNG"), pp, MAX_PIXELS, budget=MemoryBudget(1 << 20))
    assert "(decoding a 451x300 image)" in str(exc.value)


def test_a_failing_resize_is_a_400_that_says_so(monkeypatch):
    def broken(img, pp):
        raise ValueError("simulated: a side rounded to nothing")

    monkeypatch.setattr(preprocess, "resize_crop", broken)
    pp = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=MEAN, std=STD)
    with pytest.raises(ImageError, match="^the image could not be resized$") as exc:
        prepare(encode(chelsea(), "PNG"), pp, MAX_PIXELS)
    assert exc.value.status == 400


def test_a_request_may_decode_up_to_its_pixel_allowance_and_not_one_pixel_more():
    """EFFNET_MAX_REQUEST_PIXELS across a request's images: an exact fit passes, the next pixel is a 413 that
    names the limit, and a refused image takes nothing from what is left."""
    from effnet_serve.core.errors import PayloadTooLarge
    from effnet_serve.engine.preprocess import PixelAllowance

    allowance = PixelAllowance(100)
    allowance.take(Image.new("RGB", (10, 5)))
    assert allowance.left == 50 and allowance.limit == 100
    with pytest.raises(PayloadTooLarge) as exc:
        allowance.take(Image.new("RGB", (17, 3)))  # 51 > 50
    assert exc.value.status == 413
    assert exc.value.message == ("the request's images decode to more than 100 pixels together "
                                 "(EFFNET_MAX_REQUEST_PIXELS); send fewer or smaller images per request")
    assert exc.value.extra == {"limit_pixels": 100}
    assert allowance.left == 50  # the refusal took nothing
    allowance.take(Image.new("RGB", (5, 10)))  # exactly what is left
    assert allowance.left == 0
    with pytest.raises(PayloadTooLarge):
        allowance.take(Image.new("RGB", (1, 1)))


def test_the_pixel_allowance_is_exact_under_concurrent_decode_threads():
    import threading

    from effnet_serve.core.errors import PayloadTooLarge
    from effnet_serve.engine.preprocess import PixelAllowance

    allowance = PixelAllowance(500)
    taken, refused = [], []
    one = Image.new("RGB", (1, 1))

    def worker() -> None:
        for _ in range(100):
            try:
                allowance.take(one)
                taken.append(1)
            except PayloadTooLarge:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 500 and len(refused) == 300 and allowance.left == 0


def test_a_jpeg_counts_against_the_allowance_at_the_scale_it_is_decoded_at():
    from effnet_serve.core.errors import PayloadTooLarge
    from serving_helpers import photo
    from effnet_serve.engine.preprocess import PixelAllowance

    big = encode(photo((1920, 1080)), quality=90)
    pp = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=MEAN, std=STD)
    drafted = 960 * 540  # the DCT-scaled decode (test_prepare_drafts_big_jpegs_by_default)
    allowance = PixelAllowance(2 * drafted)
    prepare(big, pp, MAX_PIXELS, pixels=allowance)
    assert allowance.left == drafted
    with pytest.raises(PayloadTooLarge):  # the full-size decode would need 1920 x 1080
        prepare(big, pp, MAX_PIXELS, draft=False, pixels=allowance)
    assert allowance.left == drafted
