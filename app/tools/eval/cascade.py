"""`effnet eval --cascade lite0,lite2 --threshold 0.6`: what a confidence cascade would score.

Every model of the cascade runs on every image (served preprocessing, the exported ONNX,
softmax as the batcher computes it); the cascade is then replayed per image with
`app.policies.cascade.escalate`, the function the server uses, so the threshold picked here means the
same online. Running every model on every image costs the sum of the models once, and in
exchange gives the single models' accuracy on the same images and a threshold sweep.

Mean MACs per image is what serving would spend: the first model's MACs for every image,
plus each later model's for the images passed on to it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ...engine.batcher import softmax
from ...policies.cascade import escalate
from .datasets import Dataset
from .metrics import wilson
from .runner import (
    EvalError,
    Progress,
    _cores,
    _load,
    default_max_pixels,
    select,
)
from ...engine.manifest import Manifest, ManifestError, load_manifest, verify_onnx
from ...engine.preprocess import set_max_pixels
from ...engine.sessions import SessionError, create_session, resolve_device

CASCADES_FILE = "cascades.json"
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class StageOutput:
    top1_prob: np.ndarray  # [n] float32
    top5: np.ndarray  # [n, 5] class indices, best first
    escalate: np.ndarray  # [n] bool, escalate() at the requested threshold on the full probabilities
    ok: np.ndarray  # [n] bool: the image could be read


def _run_model(folder: Path, manifest: Manifest, samples, threshold: float, *, batch: int, device: str,
               threads: int | None, workers: int | None, max_pixels: int, progress: bool) -> StageOutput:
    try:
        session = create_session(
            verify_onnx(folder, manifest), manifest.onnx.input.name, manifest.onnx.output.name,
            device=resolve_device(device), threads=threads or _cores(), spinning=False,
        )
    except (ManifestError, SessionError) as exc:
        raise EvalError(f"model {folder.name}: {exc}") from None
    n = len(samples)
    out = StageOutput(np.zeros(n, np.float32), np.zeros((n, 5), np.int64), np.zeros(n, bool), np.zeros(n, bool))
    bar = Progress(n, f"eval {manifest.name}", progress)
    idx: list[int] = []
    xs: list[np.ndarray] = []

    def flush() -> None:
        probs = softmax(np.asarray(session.run(np.stack(xs))))
        for j, p in zip(idx, probs):
            out.top1_prob[j] = float(p.max())
            out.top5[j] = np.argsort(-p, kind="stable")[:5]
            out.escalate[j] = escalate(p, threshold)
            out.ok[j] = True
        bar.update(len(xs))
        idx.clear()
        xs.clear()

    try:
        with ThreadPoolExecutor(max_workers=workers or _cores(), thread_name_prefix="eval-decode") as pool:
            # Decoded tensors are small next to the photos; a bounded map keeps memory flat.
            chunk = max(64, 4 * batch)
            for start in range(0, n, chunk):
                part = samples[start:start + chunk]
                for k, t in enumerate(pool.map(lambda s: _load(s, manifest, max_pixels), part)):
                    if isinstance(t, str):
                        bar.update(1)
                        continue
                    idx.append(start + k)
                    xs.append(t)
                    if len(xs) == batch:
                        flush()
            if xs:
                flush()
    finally:
        bar.close()
    return out


def _acc(correct: int, n: int) -> tuple[float | None, list[float] | None]:
    interval = wilson(correct, n)
    if interval is None:  # n == 0
        return None, None
    lo, hi = interval
    return round(100.0 * correct / n, 2), [round(100.0 * lo, 2), round(100.0 * hi, 2)]


def replay(stages: list[StageOutput], macs: list[int], labels: np.ndarray, threshold: float,
           decisions: list[np.ndarray] | None = None) -> dict:
    """The cascade's outcome on the scored images. `decisions[s][i]`: escalate after stage s
    (default: escalate() on the stored top-1 probability, which is what it looks at)."""
    ok = np.logical_and.reduce([s.ok for s in stages])
    n = int(ok.sum())
    top1 = top5 = 0
    spent = 0
    reached = [0] * len(stages)
    for i in np.flatnonzero(ok):
        s = 0
        while True:
            reached[s] += 1
            spent += macs[s]
            if s + 1 >= len(stages):
                break
            go = decisions[s][i] if decisions is not None else escalate(np.asarray([stages[s].top1_prob[i]]), threshold)
            if not go:
                break
            s += 1
        pred = stages[s].top5[i]
        top1 += int(pred[0] == labels[i])
        top5 += int(labels[i] in pred)
    t1, t1ci = _acc(top1, n)
    t5, t5ci = _acc(top5, n)
    return {
        "threshold": threshold, "size": n, "top1": t1, "top1_ci95": t1ci, "top5": t5, "top5_ci95": t5ci,
        "top1_correct": top1, "top5_correct": top5,
        "mean_macs": round(spent / n) if n else None,
        "escalated_fraction": round(reached[1] / n, 4) if n else None,
        "reached": reached,  # images that reached each stage
    }


def evaluate_cascade(
    repo: Path, names: list[str], dataset: Dataset, threshold: float, *, batch: int = 8, limit: int | None = None,
    seed: int = 0, device: str = "auto", threads: int | None = None, workers: int | None = None,
    max_pixels: int | None = None, progress: bool = True,
) -> dict:
    if len(names) < 2:
        raise EvalError("--cascade names at least two models, cheapest first: --cascade lite0,lite2")
    if not 0.0 <= threshold <= 1.0:
        raise EvalError("--threshold must lie in [0, 1]")
    manifests = []
    for name in names:
        try:
            manifests.append(load_manifest(repo / name))
        except ManifestError as exc:
            raise EvalError(f"model {name}: {exc}") from None
    if any(m.labels != manifests[0].labels for m in manifests):
        raise EvalError("the cascade's models must share one label list")
    max_pixels = max_pixels or default_max_pixels()
    set_max_pixels(max_pixels)
    samples = select(dataset.samples, limit, seed)
    labels = np.asarray([s.label for s in samples])
    t0 = time.perf_counter()
    stages = [
        _run_model(repo / name, m, samples, threshold, batch=batch, device=device, threads=threads, workers=workers,
                   max_pixels=max_pixels, progress=progress)
        for name, m in zip(names, manifests)
    ]
    macs = [m.macs for m in manifests]
    result = replay(stages, macs, labels, threshold, decisions=[s.escalate for s in stages])
    ok = np.logical_and.reduce([s.ok for s in stages])
    singles = {}
    for name, m, s in zip(names, manifests, stages):
        t1, t1ci = _acc(int(sum(s.top5[i][0] == labels[i] for i in np.flatnonzero(ok))), int(ok.sum()))
        t5, t5ci = _acc(int(sum(labels[i] in s.top5[i] for i in np.flatnonzero(ok))), int(ok.sum()))
        singles[name] = {"top1": t1, "top1_ci95": t1ci, "top5": t5, "top5_ci95": t5ci, "macs": m.macs,
                         "pretrained": m.weights.pretrained}
    return {
        "cascade": names,
        "name": ",".join(names),
        "dataset": dataset.name,
        "format": dataset.format,
        **result,
        "images": len(samples),
        "errors": int(len(samples) - ok.sum()),
        "models": singles,
        "sweep": [{k: v for k, v in replay(stages, macs, labels, t).items() if k not in ("top1_ci95", "top5_ci95")}
                  for t in sorted({*SWEEP, threshold})],
        "pretrained": all(m.weights.pretrained for m in manifests),
        "wall_s": round(time.perf_counter() - t0, 3),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_cascade(repo: Path, result: dict) -> Path:
    """Record the result in <repo>/cascades.json (keyed by cascade and threshold) for `effnet report`."""
    path = repo / CASCADES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    keep = ("cascade", "threshold", "dataset", "size", "top1", "top1_ci95", "top5", "top5_ci95", "mean_macs",
            "escalated_fraction", "models", "pretrained", "date")
    data[f"{result['name']}@{result['threshold']:g}"] = {k: result[k] for k in keep}
    fd, tmp = tempfile.mkstemp(dir=repo, prefix=f".{CASCADES_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
