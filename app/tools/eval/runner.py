"""Run a labelled image set through a served model exactly as the server would.

Same code path as `effnet serve`: the manifest is loaded and validated by `app.engine.manifest`,
the ONNX file is checked against its sha256, the session comes from `app.engine.sessions`, and
every image goes through `app.engine.preprocess.prepare` (decode, EXIF rotation, draft decoding,
resize, crop, normalise) with the server's pixel limit. No torch.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ...core.errors import ImageError
from .datasets import Dataset, Sample
from .metrics import Tally
from ...engine.manifest import MANIFEST_FILE, Manifest, load_manifest, verify_onnx
from ...engine.preprocess import prepare, set_max_pixels
from ...engine.sessions import create_session, resolve_device


class EvalError(Exception):
    """The evaluation cannot run or its result cannot be recorded; the message says why."""


def default_max_pixels() -> int:
    """The server's default EFFNET_MAX_IMAGE_PIXELS, so eval refuses what the server refuses."""
    from ...core.config import Settings

    return int(Settings.model_fields["max_image_pixels"].default)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def select(samples: list[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """`--limit N`: a fixed pseudo-random N of the set (in dataset order), not the first N.

    The first N of a class-sorted folder would be one or two classes.
    """
    if limit is None or limit >= len(samples):
        return list(samples)
    keep = sorted(random.Random(seed).sample(range(len(samples)), max(0, limit)))
    return [samples[i] for i in keep]


class Progress:
    """tqdm when it is installed and enabled, else a plain line every few seconds on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        self._bar = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= 2.0 or self.done >= self.total:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class EvalResult:
    model: str
    dataset: str
    format: str
    tally: Tally
    labels: list[str]
    onnx_sha256: str
    images: int  # selected for evaluation (scored + errors)
    errors: list[dict] = field(default_factory=list)  # {"path", "error"} for images that could not be read
    predictions: list[tuple[str, int, list[int]]] = field(default_factory=list)  # (path, label, top-5) per scored image
    missing: int = 0  # listed by the dataset but not on disk
    wall_s: float = 0.0
    infer_s: float = 0.0
    batch: int = 1
    provider: str = ""
    date: str = ""

    def measured(self) -> dict:
        """The manifest's `accuracy.measured` object (docs/manifest.md)."""
        s = self.tally.summary()
        return {
            "top1": s["top1"],
            "top5": s["top5"],
            "top1_ci95": s["top1_ci95"],
            "top5_ci95": s["top5_ci95"],
            "dataset": self.dataset,
            "size": s["size"],
            "date": self.date,
            "errors": len(self.errors),
        }

    def write_predictions(self, path: Path) -> None:
        """One CSV row per scored image: path, label, top-1 correct, the top-5 indices and names."""
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "label_name", "top1_correct", "top5_correct", "top5", "top5_names"])
            for p, y, top5 in self.predictions:
                w.writerow([p, y, self.labels[y], int(top5[0] == y), int(y in top5),
                            " ".join(map(str, top5)), "|".join(self.labels[i] for i in top5)])

    def to_dict(self, confusion: int = 10) -> dict:
        s = self.tally.summary()
        scored = s["size"]
        return {
            "model": self.model,
            "dataset": self.dataset,
            "format": self.format,
            **s,
            "images": self.images,
            "errors": len(self.errors),
            "error_files": self.errors,
            "missing": self.missing,
            "img_per_s": round(self.images / self.wall_s, 2) if self.wall_s > 0 else None,
            "model_img_per_s": round(scored / self.infer_s, 2) if self.infer_s > 0 else None,
            "wall_s": round(self.wall_s, 3),
            "batch": self.batch,
            "provider": self.provider,
            "onnx_sha256": self.onnx_sha256,
            "date": self.date,
            "confusion": self.tally.confusion(self.labels, confusion),
        }


def _load(sample: Sample, manifest: Manifest, max_pixels: int) -> np.ndarray | str:
    """The served preprocessing for one file; an error message instead of raising."""
    try:
        data = sample.path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or type(exc).__name__}"
    try:
        return prepare(data, manifest.preprocess, max_pixels).tensor
    except ImageError as exc:
        return str(exc)


def evaluate(
    folder: Path,
    dataset: Dataset,
    *,
    batch: int = 8,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> EvalResult:
    if batch < 1:
        raise EvalError("--batch must be at least 1")
    from ...engine.manifest import ManifestError
    from ...engine.sessions import SessionError

    try:
        manifest = load_manifest(folder)
        onnx_path = verify_onnx(folder, manifest)
        session = create_session(
            onnx_path, manifest.onnx.input.name, manifest.onnx.output.name,
            device=resolve_device(device), threads=threads or _cores(), spinning=False,
        )
    except (ManifestError, SessionError) as exc:
        raise EvalError(f"model {folder.name}: {exc}") from None
    max_pixels = max_pixels or default_max_pixels()
    set_max_pixels(max_pixels)  # Pillow's own bomb guard, as the server sets it

    samples = select(dataset.samples, limit, seed)
    result = EvalResult(
        model=manifest.name, dataset=dataset.name, format=dataset.format, tally=Tally(), labels=manifest.labels,
        onnx_sha256=manifest.onnx.sha256, images=len(samples), missing=len(dataset.missing), batch=batch,
        provider=session.provider,
    )
    bar = Progress(len(samples), f"eval {manifest.name}", progress)
    pending: deque[tuple[Sample, Future]] = deque()
    it = iter(samples)
    window = 2 * batch + (workers or _cores())  # decode ahead while the model runs
    xs: list[np.ndarray] = []
    ys: list[int] = []
    paths: list[str] = []

    def run_batch() -> None:
        t = time.perf_counter()
        logits = session.run(np.stack(xs))
        result.infer_s += time.perf_counter() - t
        top5 = result.tally.add(logits, np.asarray(ys))
        result.predictions += [(p, y, row.tolist()) for p, y, row in zip(paths, ys, top5)]
        bar.update(len(xs))
        xs.clear()
        ys.clear()
        paths.clear()

    if samples:  # warm-up outside the timing, as the server warms each batch shape before it reports ready
        crop = manifest.preprocess.crop
        session.run(np.zeros((min(batch, len(samples)), 3, crop, crop), np.float32))
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=workers or _cores(), thread_name_prefix="eval-decode") as pool:
            for s in it:
                pending.append((s, pool.submit(_load, s, manifest, max_pixels)))
                if len(pending) >= window:
                    break
            while pending:
                sample, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(_load, nxt, manifest, max_pixels)))
                out = fut.result()
                if isinstance(out, str):
                    result.errors.append({"path": str(sample.path), "error": out})
                    bar.update(1)
                    continue
                xs.append(out)
                ys.append(sample.label)
                paths.append(str(sample.path))
                if len(xs) == batch:
                    run_batch()
            if xs:
                run_batch()
    finally:
        bar.close()
    result.wall_s = time.perf_counter() - t0
    result.date = datetime.now(UTC).isoformat(timespec="seconds")
    return result


def write_measured(folder: Path, measured: dict, onnx_sha256: str) -> Path:
    """Set `accuracy.measured` in folder/manifest.json, atomically; every other field is kept as it is.

    Refuses when the model was rebuilt while it was being evaluated (the manifest's onnx.sha256
    no longer matches the file that was measured), and checks that the server still accepts the result.
    """
    path = folder / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read {path}: {exc}") from None
    if raw.get("onnx", {}).get("sha256") != onnx_sha256:
        raise EvalError(f"{path} now describes another model.onnx (rebuilt during eval?); not recording")
    accuracy = raw.get("accuracy")
    if not isinstance(accuracy, dict):
        accuracy = {"reference": None}
    accuracy["measured"] = measured
    raw["accuracy"] = accuracy
    try:
        Manifest.model_validate(raw)
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError; the message is enough
        raise EvalError(f"the updated manifest would not validate: {exc}") from None

    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MANIFEST_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(raw, indent=2) + "\n")  # the build step's formatting
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600; a server running as another user must still read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path
