"""Decode and preprocess: the result is torchvision's eval transform on real photos (recorded by
torchvision itself, tests/data/generate_preprocess_reference.py), every odd input mode keeps its
content, hostile inputs are refused.

The bound, without draft, per (photo, model) of the oracle:
    max |ours - torchvision| <= MAX_LEVELS 8-bit levels (one level = 1 / (255 * std) per channel)
    mean |ours - torchvision| <= 1e-3 (normalised units)
MAX_LEVELS is one level: float32 rounding of the normalisation aside, the server's output is
torchvision's (app/engine/preprocess.py resizes the whole image and then crops, as torchvision does;
resizing only the box that survives the crop was 2x faster on a 1080p upload but rounded up to two
levels differently on a few pixels, so it was dropped).

Five planted bugs (tests/serving/planted_bugs.py) against that bound, on every photo of the
oracle. Each bug cell is the weakest miss over the photo's recorded models (how many in
brackets): max |diff| in levels / mean |diff| x 1e-3. The bound is 1 level / 1.0 x 1e-3.
"no antialias" counts only where the photo is shrunk 1.15x or more: upscaling never widens the
kernel, so there the bug changes nothing. "product" is the server's worst case, max levels /
mean; "weakest" is the smallest factor by which any planted bug misses the bound on that photo.

| photo            | product      | lanczos  | bilinear  | no antialias | crop +1 px  | BGR       | weakest |
| ---------------- | ------------ | -------- | --------- | ------------ | ----------- | --------- | ------- |
| chelsea (8)      | 0.0 / 8.5e-8 | 7 / 5.1  | 15 / 16.0 | 13 / 12.8    | 75 / 58.8   | 133 / 378 | 7.0x    |
| coffee (7)       | 0.0 / 6.8e-8 | 16 / 4.1 | 29 / 15.1 | 53 / 12.4    | 195 / 94.9  | 191 / 554 | 16x     |
| astronaut (7)    | 0.0 / 8.4e-8 | 15 / 5.8 | 26 / 21.0 | 53 / 33.9    | 189 / 159.3 | 184 / 273 | 15x     |
| rocket (7)       | 0.0 / 6.7e-8 | 13 / 2.4 | 20 / 8.0  | 54 / 9.9     | 151 / 27.2  | 218 / 227 | 13x     |
| grace_hopper (7) | 0.0 / 7.9e-8 | 19 / 6.6 | 32 / 11.1 | 61 / 34.7    | 198 / 170.0 | 216 / 275 | 19x     |
| retina (6)       | 0.0 / 5.6e-8 | 4 / 2.5  | 9 / 4.2   | 14 / 6.6     | 112 / 31.5  | 196 / 713 | 4.0x    |
| retina, draft (2)| 0.0 / 5.6e-8 | 8 / 2.2  | 16 / 3.6  | 26 / 8.0     | 144 / 22.7  | 195 / 712 | 8.0x    |

The draft path. The server decodes a JPEG at least 4x bigger than the resize at libjpeg's 1/2, 1/4 or
1/8 scale, and that is its default: of the oracle's photos, retina at the 256 px recipes takes it
(`test_which_photos_take_the_draft_path`). The oracle records torchvision's transform of that reduced
decode, so the draft path is held to the same one-level bound and the planted bugs are tried on it (the
"draft" row). Against torchvision on the *whole* photo the reduced decode differs by up to 39 levels
(0.49 mean): a bound that loose would pass every filter bug, so it is only a bound on what drafting costs
(DRAFT_MAX_LEVELS, DRAFT_MEAN_LEVELS), never the check on the resize.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import planted_bugs
import torchvision_oracle as oracle
from effnet_serve.core.errors import ImageError
from effnet_serve.engine.manifest import Preprocess
from effnet_serve.engine.preprocess import open_image, prepare, to_rgb
from serving_helpers import MEAN, STD, encode, photo

# tests/data/odd_inputs.py (the oracle loads it): the small real picture and the odd-mode uploads made of it.
real_picture, decoded = oracle.odd_inputs.real_picture, oracle.odd_inputs.decoded

PP = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=MEAN, std=STD)
MAX_PIXELS = 50_000_000

MAX_LEVELS = 1  # one 8-bit level: see the module docstring
LEVEL_EPS = 0.01  # float32 rounding of the normalisation, in levels
MEAN_BOUND = oracle.MEAN_BOUND
DRAFT_MAX_LEVELS = 64
DRAFT_MEAN_LEVELS = 1.0
BUG_MARGIN = 2.0  # a planted bug must miss the bound by at least this factor
ANTIALIAS_SHRINK = 1.15  # "no antialias" is only a bug where the photo is shrunk at least this much

ENTRIES = oracle.entries()
FULL = [e for e in ENTRIES if e.draft is None]  # the photo decoded at full size
DRAFTED = [e for e in ENTRIES if e.draft is not None]  # a big JPEG as the server decodes it by default


def recipe(entry: oracle.Entry) -> Preprocess:
    return Preprocess(resize=entry.resize, crop=entry.crop, interpolation=entry.interpolation,
                      mean=entry.mean, std=entry.std)


def misses(ours: np.ndarray, ref: np.ndarray, std) -> tuple[float, float]:
    """(max |diff| in 8-bit levels, mean |diff| in normalised units)."""
    d = np.abs(ours.astype(np.float64) - ref)
    level = (1.0 / (255.0 * np.asarray(std, np.float64)))[:, None, None]
    return float((d / level).max()), float(d.mean())


def within_bound(max_levels: float, mean: float) -> bool:
    return max_levels <= MAX_LEVELS + LEVEL_EPS and mean <= MEAN_BOUND


# --- the oracle itself ----------------------------------------------------------------------
def test_the_oracle_covers_every_served_recipe_and_normalises_as_torchvision():
    recorded = {(e.model, e.resize, e.crop, e.interpolation) for e in ENTRIES}
    tv = oracle.recipes()
    expected = {(name, r["resize"], r["crop"], r["interpolation"]) for name, r in tv.items()}
    expected |= {("lite0", 256, 224, "bicubic"), ("lite1", 272, 240, "bicubic"), ("lite2", 292, 260, "bicubic")}
    assert recorded == expected
    assert {e.photo for e in ENTRIES} == set(oracle.index()["photos"]) and len(oracle.index()["photos"]) >= 5
    for e in ENTRIES:  # our ToTensor + Normalize redo is torchvision's, on the rows torchvision normalised
        ref = oracle.reference(e)
        np.testing.assert_allclose(ref[:, [0, -1], :], oracle.torchvision_rows(e), rtol=0, atol=1e-6, err_msg=e.id)


# --- matches torchvision --------------------------------------------------------------------
@pytest.mark.parametrize("entry", FULL, ids=lambda e: e.id)
def test_matches_torchvision_without_draft(entry):
    ours = prepare(oracle.photo_bytes(entry.photo), recipe(entry), MAX_PIXELS, draft=False).tensor
    assert ours.shape == (3, entry.crop, entry.crop) and ours.dtype == np.float32
    max_levels, mean = misses(ours, oracle.reference(entry), entry.std)
    assert within_bound(max_levels, mean), f"{entry.id}: max {max_levels:.2f} levels, mean {mean:.2e}"


def _decoded_size(e: oracle.Entry) -> tuple[int, int]:
    return e.decoded_size or tuple(oracle.index()["photos"][e.photo]["size"])


def _bug_entries(bug: str) -> list[oracle.Entry]:
    if bug != "no_antialias":
        return ENTRIES
    return [e for e in ENTRIES if min(_decoded_size(e)) >= ANTIALIAS_SHRINK * e.resize]


@pytest.mark.parametrize("bug", sorted(planted_bugs.BUGS))
def test_planted_bugs_fail_the_bound_on_every_photo(bug):
    """On both paths: the full decode, and the draft decode the server uses by default for big JPEGs."""
    entries = _bug_entries(bug)
    assert {e.photo for e in entries} == {e.photo for e in ENTRIES}  # every photo is tried
    assert any(e.draft for e in entries)  # and the draft path
    weak = []
    for e in entries:
        wrong = planted_bugs.prepare_with(bug, oracle.photo_bytes(e.photo), recipe(e), MAX_PIXELS, draft=bool(e.draft))
        max_levels, mean = misses(wrong, oracle.reference(e), e.std)
        factor = max(max_levels / MAX_LEVELS, mean / MEAN_BOUND)
        if factor < BUG_MARGIN:
            weak.append(f"{e.id}: max {max_levels:.1f} levels, mean {mean:.2e}")
    assert not weak, f"{bug} passes or nearly passes the bound on: {weak}"


# --- the draft path -------------------------------------------------------------------------
# The server's default for a big JPEG: libjpeg decodes it at 1/2, 1/4 or 1/8 scale, then the same resize
# and crop run. The oracle records torchvision's transform of that reduced decode too, so the path is held
# to the same one-level bound (and the planted filter bugs above are tried on it); what the reduced
# decode itself costs against the full one is bounded separately, below.
def _draft_misses(ours: np.ndarray, ref: np.ndarray, std) -> tuple[float, float]:
    max_levels, mean = misses(ours, ref, std)
    return max_levels, mean / float(np.mean(1.0 / (255.0 * np.asarray(std))))


def test_which_photos_take_the_draft_path():
    """Every (photo, resize) the oracle recorded: drafted exactly where it recorded a draft decode, and there
    at the recorded size; decoded whole everywhere else. And the draft is what the server does by default."""
    drafted = {(e.photo, e.resize): e.decoded_size for e in DRAFTED}
    assert drafted == {("retina", 256): (706, 706)}  # the one big JPEG, at the 256 px recipes: 1/2 scale
    for name, resize in sorted({(e.photo, e.resize) for e in FULL}):
        want = drafted.get((name, resize), tuple(oracle.index()["photos"][name]["size"]))
        assert open_image(oracle.photo_bytes(name), MAX_PIXELS, resize).size == want, (name, resize)
    for e in DRAFTED:
        assert prepare(oracle.photo_bytes(e.photo), recipe(e), MAX_PIXELS).size == e.decoded_size


@pytest.mark.parametrize("entry", DRAFTED, ids=lambda e: e.id)
def test_draft_path_matches_torchvision_on_the_draft_decode(entry):
    """The default path for a big JPEG, held to the same bound as the full decode."""
    ours = prepare(oracle.photo_bytes(entry.photo), recipe(entry), MAX_PIXELS).tensor
    max_levels, mean = misses(ours, oracle.reference(entry), entry.std)
    assert within_bound(max_levels, mean), f"{entry.id}: max {max_levels:.2f} levels, mean {mean:.2e}"


@pytest.mark.parametrize("entry", DRAFTED, ids=lambda e: e.id)
def test_what_the_draft_decode_costs_against_the_full_one_is_bounded(entry):
    """The reduced decode against torchvision on the whole photo (measured: 39 levels max, 0.49 mean)."""
    full = next(e for e in FULL if (e.photo, e.model) == (entry.photo, entry.model))
    ours = prepare(oracle.photo_bytes(entry.photo), recipe(entry), MAX_PIXELS, draft=True).tensor
    max_levels, mean_levels = _draft_misses(ours, oracle.reference(full), entry.std)
    assert max_levels <= DRAFT_MAX_LEVELS and mean_levels <= DRAFT_MEAN_LEVELS, (max_levels, mean_levels)
    assert not within_bound(*misses(ours, oracle.reference(full), entry.std))  # why it is not the full decode's bound


def test_draft_keeps_lite0s_top1_on_real_photos(lite0_repo):
    """The labelled package photos as a camera would send them (4x, JPEG): drafted or not, same answer."""
    import onnxruntime as ort
    from eval_photos import PHOTOS

    from effnet_serve.engine.batcher import softmax
    from effnet_serve.engine.manifest import load_manifest

    manifest = load_manifest(lite0_repo / "lite0")
    pp = manifest.preprocess
    session = ort.InferenceSession(str(lite0_repo / "lite0" / manifest.onnx.file), providers=["CPUExecutionProvider"])
    for p in PHOTOS:
        with Image.open(p.path()) as im:
            small = im.convert("RGB")
        big = small.resize((small.width * 4, small.height * 4), Image.Resampling.LANCZOS)
        data = encode(big, "JPEG", quality=92)
        exact = prepare(data, pp, MAX_PIXELS, draft=False)
        drafted = prepare(data, pp, MAX_PIXELS, draft=True)
        assert drafted.size[0] <= big.width // 2, p.key  # the DCT-scaled decode really ran
        max_levels, mean_levels = _draft_misses(drafted.tensor, exact.tensor, pp.std)
        assert max_levels <= DRAFT_MAX_LEVELS and mean_levels <= DRAFT_MEAN_LEVELS, (p.key, max_levels, mean_levels)
        probs = softmax(session.run(None, {manifest.onnx.input.name: np.stack([exact.tensor, drafted.tensor])})[0])
        assert probs[0].argmax() == probs[1].argmax(), p.key
        assert abs(float(probs[0].max() - probs[1].max())) <= 0.02, (p.key, probs.max(axis=1))


def test_draft_decodes_big_jpegs_smaller_but_never_below_twice_the_target():
    big = encode(photo((1920, 1080)), quality=90)
    assert open_image(big, MAX_PIXELS, None).size == (1920, 1080)
    assert open_image(big, MAX_PIXELS, PP.resize).size == (960, 540)  # 1/2 scale: 1/4 would give 270 < 2 * 256
    assert open_image(big, MAX_PIXELS, 64).size == (240, 135)  # 1/8 is the JPEG limit; 135 >= 128


def test_small_jpegs_are_not_drafted():
    assert open_image(encode(photo((400, 300))), MAX_PIXELS, PP.resize).size == (400, 300)


# --- odd but valid inputs: the content survives -----------------------------------------------
# The uploads and the RGB picture each must become: tests/data/odd_inputs.py (shared with the oracle's
# generator, which recorded torchvision's transform of every expected picture).
_ODD = oracle.odd_inputs.build()
ODD = {name: data for name, (data, _) in _ODD.items()}  # also posted by tests/reliability/test_rel_inputs.py


@pytest.mark.parametrize("name", sorted(_ODD))
def test_every_odd_mode_keeps_its_content(name):
    data, as_rgb = _ODD[name]
    source = decoded(data)
    expected = as_rgb(source)
    assert expected.mode == "RGB" and expected.size == source.size
    # The server's pixels are the picture's own, converted as documented ...
    np.testing.assert_array_equal(np.asarray(open_image(data, MAX_PIXELS)), np.asarray(expected))
    # ... and the tensor is torchvision's eval transform of that picture, pixel for pixel (tiny, huge and
    # 1000:1 pictures included); only float32 rounding of the normalisation is left.
    out = prepare(data, PP, MAX_PIXELS)
    assert out.tensor.shape == (3, 224, 224) and out.tensor.dtype == np.float32
    max_levels, _ = misses(out.tensor, oracle.odd_reference(name, expected, PP.mean, PP.std), PP.std)
    assert max_levels <= LEVEL_EPS, f"{name}: {max_levels:.2f} levels from torchvision"


@pytest.mark.parametrize("name,mode", [("cmyk_jpeg", "RGB"), ("webp", "RGB"), ("palette_gif", "RGB"),
                                       ("grayscale_jpeg", "L"), ("int32_tiff", "L"), ("float_tiff", "L"),
                                       ("sixteen_bit_png", "L"), ("unit_float_tiff", "L")])
def test_colour_and_grey_modes_still_show_the_photo(name, mode):
    """Against the photo before it was re-encoded: a swapped, inverted or clipped channel cannot pass."""
    want = np.asarray(real_picture().convert(mode).convert("RGB"), np.float64)
    got = np.asarray(open_image(ODD[name], MAX_PIXELS), np.float64)
    assert np.abs(got - want).mean() <= 4.0, name  # JPEG, WebP and a 256-colour palette lose a little


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


# EXIF orientation -> how a viewer turns the stored pixels upright (the TIFF/EXIF definitions),
# written with numpy so the reference does not share Pillow's transpose code.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # needs 90 degrees clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, 1),  # needs 90 degrees counter-clockwise
}
STORED = {k: f for k, f in UPRIGHT.items()} | {6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(orientation):
    upright = np.asarray(real_picture((96, 64)))  # landscape, nothing symmetric about it
    stored = np.ascontiguousarray(STORED[orientation](upright))
    np.testing.assert_array_equal(UPRIGHT[orientation](stored), upright)  # the table is self-consistent
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    served = np.asarray(open_image(data, MAX_PIXELS))
    # Exactly the decoded pixels turned upright, and so the photo the camera saw.
    np.testing.assert_array_equal(served, UPRIGHT[orientation](np.asarray(decoded(data).convert("RGB"))))
    assert served.shape == upright.shape
    assert np.abs(served.astype(int) - upright).mean() < 3


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
    """A small deterministic mutation campaign on the decode path (tests/reliability fuzzes it further)."""
    rng = np.random.default_rng(1)
    seeds = {fmt: encode(real_picture((64, 48)), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP")}
    outcomes: Counter = Counter()
    for fmt, seed in seeds.items():
        for _ in range(60):
            data = bytearray(seed)
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                data = data[: int(rng.integers(1, len(data)))]
            try:
                out = prepare(bytes(data), PP, MAX_PIXELS)
            except ImageError as exc:
                assert exc.status == 400
                outcomes[fmt, "refused"] += 1
                continue
            assert out.tensor.shape == (3, 224, 224) and np.isfinite(out.tensor).all()
            outcomes[fmt, "decoded"] += 1
    # The campaign reached both sides: damaged files that still decode (JPEG and GIF carry no
    # checksum) and refusals in every format (PNG's CRCs refuse nearly every mutation).
    assert sum(n for (_, side), n in outcomes.items() if side == "decoded") >= 20, sorted(outcomes.items())
    assert all(outcomes[fmt, "refused"] >= 10 for fmt in seeds), sorted(outcomes.items())
