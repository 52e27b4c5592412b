"""Preprocessing alone: a 1920x1080 JPEG to the model's input tensor.

* plain: what a user writes (and the reference transform): full-size decode with Pillow,
  resize the whole image, centre-crop, ToTensor + Normalize;
* ours: `app.engine.preprocess.prepare(..., draft=True)`, the service's path (draft decode, resize
  only the box that survives the crop), and `draft=False` for comparison.

The difference is the mean absolute difference from the plain (reference) tensor, in
normalised units.
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from effnet_serve.engine.manifest import Preprocess
from effnet_serve.engine.preprocess import prepare
from benchmarks.records import Prep

MAX_PIXELS = 50_000_000


def reference(data: bytes, pp: Preprocess) -> np.ndarray:
    """torchvision's eval transform on a PIL image, written out: the plain path."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    new_w, new_h = (pp.resize, int(pp.resize * h / w)) if w <= h else (int(pp.resize * w / h), pp.resize)
    filt = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}[pp.interpolation]
    img = img.resize((new_w, new_h), filt)
    left, top = int(round((new_w - pp.crop) / 2.0)), int(round((new_h - pp.crop) / 2.0))
    img = img.crop((left, top, left + pp.crop, top + pp.crop))
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.asarray(pp.mean, dtype=np.float32)) / np.asarray(pp.std, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def _time(fn, reps: int) -> float:
    fn()  # first call: caches, page faults
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def measure(data: bytes, name: str, pp: Preprocess, reps: int) -> Prep:
    ref = reference(data, pp)
    ours = prepare(data, pp, MAX_PIXELS, draft=True)
    full = prepare(data, pp, MAX_PIXELS, draft=False)
    return Prep(model=name, resize=pp.resize, crop=pp.crop, reps=reps, photo_bytes=len(data),
                plain_decode_ms=_time(lambda: Image.open(io.BytesIO(data)).convert("RGB"), reps),
                plain_ms=_time(lambda: reference(data, pp), reps),
                ours_ms=_time(lambda: prepare(data, pp, MAX_PIXELS, draft=True), reps),
                ours_nodraft_ms=_time(lambda: prepare(data, pp, MAX_PIXELS, draft=False), reps),
                decoded_size=list(ours.size), diff=float(np.abs(ours.tensor - ref).mean()),
                diff_nodraft=float(np.abs(full.tensor - ref).mean()))


def measure_all(plan, photo: Path) -> list[Prep]:
    """The prep phase: every matrix model's preprocessing of the 1920x1080 photo."""
    from effnet_serve.engine.manifest import load_manifest
    from benchmarks.harness import log

    data = photo.read_bytes()
    out = []
    for name in plan.full:
        log(f"preprocessing {name}")
        out.append(measure(data, name, load_manifest(plan.repo / name).preprocess, plan.prep_reps))
    return out
