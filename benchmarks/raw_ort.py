"""Raw ONNX Runtime: the limit the service is measured against.

The session comes from `app.engine.sessions.create_session` with the thread settings the server
reads from the environment (`Settings()`), so the only difference from the service is
everything around `session.run`: HTTP, decode, queueing, batching.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np

from app.core.config import Settings
from app.engine.manifest import load_manifest, verify_onnx
from app.engine.sessions import create_session, resolve_device

# A smaller batch wins the tie: within this fraction of the best throughput, lower latency is worth more.
BEST_BATCH_TOLERANCE = 0.03


def measure_model(folder: Path, batches: list[int], seconds: float, min_runs: int = 3, warm_runs: int = 2) -> dict:
    """img/s and latency of `session.run` at each batch size, on random input."""
    settings = Settings()
    manifest = load_manifest(folder)
    path = verify_onnx(folder, manifest)
    device = resolve_device(settings.device)
    t0 = time.perf_counter()
    session = create_session(path, manifest.onnx.input.name, manifest.onnx.output.name,
                             device=device, threads=settings.threads, spinning=settings.ort_spinning)
    load_s = time.perf_counter() - t0
    crop = manifest.preprocess.crop
    rng = np.random.default_rng(0)
    out: dict = {
        "provider": session.provider, "device": session.device, "threads": settings.threads,
        "spinning": settings.ort_spinning, "session_load_s": load_s, "macs": manifest.macs,
        "params": manifest.params, "resolution": crop, "batches": {},
    }
    for b in batches:
        x = rng.standard_normal((b, 3, crop, crop), dtype=np.float32)
        runs = min_runs
        for i in range(warm_runs):
            t = time.perf_counter()
            session.run(x)
            if i == 0 and time.perf_counter() - t > seconds / 2:
                runs = 2  # a slow model (or a busy machine): two timed runs, not a minute of them
                break
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < runs or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            session.run(x)
            times.append(time.perf_counter() - t)
        times.sort()
        total = sum(times)
        out["batches"][str(b)] = {
            "batch": b,
            "runs": len(times),
            "img_per_s": b * len(times) / total,
            "batch_ms_p50": 1000.0 * times[len(times) // 2],
            "batch_ms_mean": 1000.0 * total / len(times),
            "ms_per_img": 1000.0 * total / len(times) / b,
        }
    del session
    gc.collect()
    return out


def best_batch(result: dict) -> int:
    rows = result["batches"].values()
    top = max(r["img_per_s"] for r in rows)
    return min(r["batch"] for r in rows if r["img_per_s"] >= (1.0 - BEST_BATCH_TOLERANCE) * top)
