"""Records torchvision's eval transform on real photos, and torchvision's published recipes, as
outside oracles for the preprocessing and family-table tests.

torchvision cannot be imported beside the project's pinned CPU torch, so this runs once, by hand,
in a separate venv (`pip install torch==2.14.1 torchvision==0.29.1 scikit-image matplotlib pillow==X`, X the
project venv's Pillow: the odd-mode uploads are encoded by it) and
its output is committed:

    /path/to/tv-venv/bin/python tests/data/generate_preprocess_reference.py

Writes three files beside itself:

- preprocess_reference.npz: `<photo>@<resize>-<crop>-<interpolation>`: torchvision's
  `CenterCrop(crop)(Resize(resize, interpolation)(img))` on the PIL image, as PNG bytes of the uint8
  RGB crop. On PIL input both transforms return a PIL image, so these pixels are torchvision's
  result exactly; `ToTensor` (/255) and `Normalize` ((x - mean) / std) are plain arithmetic the
  tests redo. `<photo>@<model>|rows` keeps torchvision's own normalised first and last rows
  (float32 [3, 2, crop]) so the tests can check that their redo is torchvision's.
- preprocess_reference.json: library versions, each photo's package, file and sha256 (the tests
  refuse to compare against a different photo), and one entry per (photo, model): its recipe and
  the two keys above.
- torchvision_recipes.json: torchvision's IMAGENET1K_V1 metadata for B0..B7 (checkpoint URL,
  eval resize/crop/interpolation/mean/std, ImageNet acc@1/acc@5, parameter count, GFLOPS) and the
  classifier dropout of each builder.

Geometries are every (resize, crop, interpolation) that build/recipes.py serves: torchvision's
B0..B7 recipes, read from torchvision's weight metadata here (not from build/), and the Lite
recipe. The Lite weights come without a torchvision recipe; their eval transform is the TF
release's: crop padding 32 (resize = crop + 32), bicubic, inputs scaled to [-1, 1] (mean = std = 0.5).

Size. A 600 px crop is 1 MB of raw pixels, so every photo at every geometry would be ~20 MB. The
five photos are recorded at the geometries up to 300 px (B0..B3 and the Lite ones, where most
traffic is). Above that (B4..B7, 380..600 px) retina (shorter side 1411, so every big geometry
downscales it, which is where antialiasing matters) at all four, and chelsea (shorter side 300,
upscaled 2x) at B7; chelsea's upscaling is also covered at B2/B3. That keeps the fixture at 5 MB.
Lite0 and B0 share one geometry (256 -> 224): its crop is stored once. Crops are stored as PNG
bytes (lossless, about half the size of deflated raw pixels).

Two more kinds of record:

- The draft path. A JPEG whose shorter side is at least 4x the resize is decoded by libjpeg at 1/2, 1/4
  or 1/8 scale, the smallest that keeps the shorter side >= 2x the resize (the server's documented
  rule, restated here, not imported). For each such (photo, model) an entry with `"draft": s` records
  torchvision's transform of the image as Pillow's `draft()` decodes it at 1/s (`decoded_size`), so the
  server's default path for big JPEGs is held to torchvision exactly, like the full decode.
- The odd-mode uploads of tests/data/odd_inputs.py (CMYK, 16-bit, float TIFF, alpha, palettes, strips,
  one pixel): `odd_inputs` maps each name to the digest of the RGB picture it must become and the key of
  torchvision's Resize(256) + CenterCrop(224) of that picture (bicubic).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import PIL
import skimage
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.models import efficientnet as tv

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import odd_inputs  # noqa: E402

# (key, package, file): real photos that pip packages ship, in several shapes and both codecs.
PHOTOS = (
    ("chelsea", "scikit-image", "chelsea.png"),  # 451x300 landscape, PNG
    ("coffee", "scikit-image", "coffee.png"),  # 600x400 landscape, PNG
    ("astronaut", "scikit-image", "astronaut.png"),  # 512x512 square, PNG
    ("rocket", "scikit-image", "rocket.jpg"),  # 640x427 landscape, JPEG
    ("grace_hopper", "matplotlib", "grace_hopper.jpg"),  # 512x600 portrait, JPEG
    ("retina", "scikit-image", "retina.jpg"),  # 1411x1411, JPEG: downscaled even at 600 px
)
SMALL = ("chelsea", "coffee", "astronaut", "rocket", "grace_hopper")
BIG_CROP = 300  # geometries with a bigger crop record fewer photos (see Size above)
BIG = {380: ("retina",), 456: ("retina",), 528: ("retina",), 600: ("retina", "chelsea")}
# retina is also the one big JPEG (shorter side > 4 x 256), so the server decodes it in the DCT
# domain at reduced size (app/engine/preprocess.py, draft): recorded at 256 -> 224 for that path's bound.
DRAFTED = {"b0": ("retina",), "lite0": ("retina",)}

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
LITE_NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
LITE = {"lite0": 224, "lite1": 240, "lite2": 260}  # the Lite models build/recipes.py serves: crop size
LITE_CROP_PADDING = 32
MODES = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
         "nearest": T.InterpolationMode.NEAREST}


def photo_path(package: str, file: str) -> Path:
    if package == "scikit-image":
        return Path(skimage.__file__).parent / "data" / file
    return Path(matplotlib.get_data_path()) / "sample_data" / file


def torchvision_recipes() -> dict:
    out = {}
    for i in range(8):
        weights = getattr(tv, f"EfficientNet_B{i}_Weights").IMAGENET1K_V1
        t = weights.transforms()
        metrics = weights.meta["_metrics"]["ImageNet-1K"]
        model = getattr(tv, f"efficientnet_b{i}")(weights=None)
        dropout = next(m.p for m in model.classifier if isinstance(m, torch.nn.Dropout))
        out[f"b{i}"] = {
            "url": weights.url,
            "resize": list(t.resize_size)[0],
            "crop": list(t.crop_size)[0],
            "interpolation": {v: k for k, v in MODES.items()}[t.interpolation],
            "antialias": t.antialias,
            "mean": list(t.mean),
            "std": list(t.std),
            "top1": metrics["acc@1"],
            "top5": metrics["acc@5"],
            "num_params": weights.meta["num_params"],
            "gflops": weights.meta["_ops"],
            "dropout": dropout,
        }
    return out


def served_recipes(tv_recipes: dict) -> dict[str, dict]:
    """model -> the eval transform it is served with: torchvision's for B0..B7, the TF release's for Lite."""
    out = {name: {k: r[k] for k in ("resize", "crop", "interpolation", "mean", "std")} for name, r in tv_recipes.items()}
    for name, crop in LITE.items():
        out[name] = {"resize": crop + LITE_CROP_PADDING, "crop": crop, "interpolation": "bicubic", **LITE_NORM}
    return out


def draft_scale(size: tuple[int, int], resize: int) -> int:
    """1/s is the DCT scale the server decodes a JPEG of this size at: the smallest of 1/2, 1/4, 1/8 whose
    shorter side stays >= 2 x resize; 1 when none does."""
    short = min(size)
    return max((s for s in (1, 2, 4, 8) if math.ceil(short / s) >= 2 * resize), default=1)


def draft_decode(data: bytes, scale: int) -> Image.Image:
    """The JPEG decoded by libjpeg at 1/scale (Pillow's draft), RGB."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    im.draft("RGB", (w // scale, h // scale))  # Pillow picks the scale by floor division of the sizes
    im.load()
    assert im.size == (math.ceil(w / scale), math.ceil(h / scale)), im.size
    return im.convert("RGB")


# The recipe the odd-mode uploads are checked with (test_serve_preprocess.PP).
ODD_RECIPE = {"resize": 256, "crop": 224, "interpolation": "bicubic"}


def png(a: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", optimize=True)
    return np.frombuffer(buf.getvalue(), np.uint8)


def main() -> None:
    tv_recipes = torchvision_recipes()
    (HERE / "torchvision_recipes.json").write_text(json.dumps(
        {"torchvision": torchvision.__version__, "weights": "IMAGENET1K_V1", "models": tv_recipes}, indent=1) + "\n")

    photos, images, files = {}, {}, {}
    for key, package, file in PHOTOS:
        data = files[key] = photo_path(package, file).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            images[key] = im.convert("RGB")
            fmt = im.format
        photos[key] = {"package": package, "file": file, "sha256": hashlib.sha256(data).hexdigest(),
                       "size": list(images[key].size)}
        photos[key]["format"] = fmt

    arrays: dict[str, np.ndarray] = {}
    entries = []
    for model, r in served_recipes(tv_recipes).items():
        geometry = f"{r['resize']}-{r['crop']}-{r['interpolation']}"
        geometric = T.Compose([T.Resize(r["resize"], interpolation=MODES[r["interpolation"]]), T.CenterCrop(r["crop"])])
        full = T.Compose([geometric, T.ToTensor(), T.Normalize(r["mean"], r["std"])])
        for pkey in (SMALL if r["crop"] <= BIG_CROP else BIG[r["crop"]]) + DRAFTED.get(model, ()):
            crop_key = f"{pkey}@{geometry}"
            if crop_key not in arrays:  # B0 and Lite0 share a geometry
                crop = geometric(images[pkey])
                assert isinstance(crop, Image.Image) and crop.size == (r["crop"], r["crop"])
                arrays[crop_key] = png(np.asarray(crop))
            rows_key = f"{pkey}@{model}|rows"
            arrays[rows_key] = np.ascontiguousarray(full(images[pkey]).numpy()[:, [0, -1], :], dtype=np.float32)
            entries.append({"photo": pkey, "model": model, **r, "crop_key": crop_key, "rows_key": rows_key})
            scale = draft_scale(images[pkey].size, r["resize"]) if photos[pkey]["format"] == "JPEG" else 1
            if scale > 1:  # the server's default path for this photo is the draft: record it too
                drafted = draft_decode(files[pkey], scale)
                crop_key = f"{pkey}/{scale}@{geometry}"
                if crop_key not in arrays:
                    arrays[crop_key] = png(np.asarray(geometric(drafted)))
                rows_key = f"{pkey}/{scale}@{model}|rows"
                arrays[rows_key] = np.ascontiguousarray(full(drafted).numpy()[:, [0, -1], :], dtype=np.float32)
                entries.append({"photo": pkey, "model": model, **r, "crop_key": crop_key, "rows_key": rows_key,
                                "draft": scale, "decoded_size": list(drafted.size)})

    odd = {}
    geometric = T.Compose([T.Resize(ODD_RECIPE["resize"], interpolation=MODES[ODD_RECIPE["interpolation"]]),
                           T.CenterCrop(ODD_RECIPE["crop"])])
    for name, (data, as_rgb) in sorted(odd_inputs.build().items()):
        picture = odd_inputs.expected(data, as_rgb)
        crop = geometric(picture)
        assert isinstance(crop, Image.Image) and crop.size == (ODD_RECIPE["crop"],) * 2
        crop_key = f"odd:{name}@{ODD_RECIPE['resize']}-{ODD_RECIPE['crop']}-{ODD_RECIPE['interpolation']}"
        arrays[crop_key] = png(np.asarray(crop))
        odd[name] = {**ODD_RECIPE, "digest": odd_inputs.digest(picture), "size": list(picture.size),
                     "crop_key": crop_key}

    np.savez_compressed(HERE / "preprocess_reference.npz", **arrays)
    index = {"torchvision": torchvision.__version__, "pillow": PIL.__version__, "photos": photos, "entries": entries,
             "odd_inputs": odd}
    (HERE / "preprocess_reference.json").write_text(json.dumps(index, indent=1) + "\n")
    size = (HERE / "preprocess_reference.npz").stat().st_size
    print(f"wrote {len(entries)} entries, {len(odd)} odd inputs, {size / 1e6:.2f} MB, and {len(tv_recipes)} "
          "torchvision recipes")


if __name__ == "__main__":
    main()
