"""Raw ONNX Runtime, outside the service: `session.run` in a loop on random input.

Two kinds of session:

* the **default session** — the ceiling: `onnxruntime.InferenceSession(path,
  providers=["CPUExecutionProvider"])` with only `intra_op_num_threads` set to the thread count the
  service uses; everything else at ORT's defaults (an arena per session, memory patterns, spinning on).
  What a user gets from ORT without our code.
* **the server's session** — `app.engine.sessions.create_session` with the settings the server reads
  from the environment (`Settings()`: threads, arena, spinning), or with the arena / spinning given.

`alternate()` runs several sessions in turns (round-robin, the order rotating every round) so that a
comparison between them sees the same minutes of this shared machine. CPU per image is the process's
CPU time (all threads) over the timed runs: the ORT cost of one image.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from effnet_serve.core.config import Settings
from effnet_serve.engine.manifest import load_manifest, verify_onnx
from effnet_serve.engine.sessions import create_session, resolve_device, spin_for
from benchmarks.harness import ROOT, log
from benchmarks.records import BatchTable, Model, OrtTiming, Record

# A smaller batch wins the tie: within this fraction of the best throughput, lower latency is worth more.
BEST_BATCH_TOLERANCE = 0.03
Run = Callable[[np.ndarray], object]


def model_file(folder: Path) -> tuple[Path, str, str, int]:
    """(model.onnx, input name, output name, crop) of one model folder."""
    manifest = load_manifest(folder)
    return verify_onnx(folder, manifest), manifest.onnx.input.name, manifest.onnx.output.name, manifest.preprocess.crop


def default_session(path: Path, input_name: str, output_name: str, threads: int) -> Run:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return lambda x: session.run([output_name], {input_name: x})[0]


def server_session(path: Path, input_name: str, output_name: str, *, threads: int | None = None,
                   spinning: bool | None = None, arena: str | None = None):
    """app.engine.sessions.create_session; None = what Settings() says (the server's configuration; spinning
    as the server gives it to this model)."""
    s = Settings()
    macs = load_manifest(path.parent).macs
    return create_session(path, input_name, output_name, device=resolve_device(s.device),
                          threads=s.threads if threads is None else threads,
                          spinning=spin_for(s.ort_spinning, macs) if spinning is None else spinning,
                          arena=s.ort_arena if arena is None else arena)


def _timed(run: Run, x: np.ndarray, seconds: float, min_runs: int) -> tuple[list[float], float]:
    times: list[float] = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return times, time.process_time() - cpu0


def _warm(run: Run, x: np.ndarray, seconds: float, warm_runs: int = 2) -> int:
    """Warm-up runs; returns how many timed runs are worth it (2 when one run takes half the window)."""
    for i in range(warm_runs):
        t = time.perf_counter()
        run(x)
        if i == 0 and time.perf_counter() - t > seconds / 2:
            return 2
    return 3


def _summary(batch: int, times: list[float], cpu_s: float) -> dict:
    times = sorted(times)
    total = sum(times)
    return {"batch": batch, "runs": len(times), "img_per_s": batch * len(times) / total,
            "batch_ms_p50": 1000.0 * times[len(times) // 2], "batch_ms_mean": 1000.0 * total / len(times),
            "ms_per_img": 1000.0 * total / len(times) / batch, "cpu_ms_per_img": 1000.0 * cpu_s / (len(times) * batch)}


def input_for(crop: int, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, crop, crop), dtype=np.float32)


def measure_one(run: Run, crop: int, batch: int, seconds: float) -> dict:
    """One session, one batch size: warm-up, then timed runs for `seconds` (at least 2-3 runs)."""
    x = input_for(crop, batch)
    runs = _warm(run, x, seconds)
    return _summary(batch, *_timed(run, x, seconds, runs))


def alternate(runs: dict[str, Run], crop: int, batches: dict[str, list[int]], seconds: float, rounds: int = 2) -> dict:
    """Each session in turn, `rounds` times per batch size, `seconds` in all per session and size.
    batches: session name -> its batch sizes. -> {name: {str(batch): summary}}."""
    out: dict[str, dict] = {name: {} for name in runs}
    for b in sorted({b for bs in batches.values() for b in bs}):
        names = [n for n in runs if b in batches[n]]
        x = input_for(crop, b)
        min_runs = {n: _warm(runs[n], x, seconds) for n in names}
        acc: dict[str, tuple[list[float], float]] = {n: ([], 0.0) for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times, cpu = _timed(runs[n], x, seconds / rounds, max(1, -(-min_runs[n] // rounds)))
                acc[n] = (acc[n][0] + times, acc[n][1] + cpu)
        for n in names:
            out[n][str(b)] = _summary(b, *acc[n])
    return out


def measure_model(folder: Path, batches: list[int], seconds: float, *, default_batches: list[int] | None = None,
                  rounds: int = 2) -> dict:
    """img/s and latency of the server's session at each batch size; with `default_batches`, the
    default session too, at those sizes, alternating with the server's session."""
    path, iname, oname, crop = model_file(folder)
    session = server_session(path, iname, oname)
    runs: dict[str, Run] = {"server": session.run}
    want = {"server": list(batches)}
    if default_batches:
        runs["default"] = default_session(path, iname, oname, Settings().threads)
        want["default"] = list(default_batches)
    measured = alternate(runs, crop, want, seconds, rounds=rounds if default_batches else 1)
    return {"device": session.device, "batches": measured["server"], "default": {"batches": measured.get("default", {})}}


def best_batch(result: dict) -> int:
    rows = result["batches"].values()
    top = max(r["img_per_s"] for r in rows)
    return min(r["batch"] for r in rows if r["img_per_s"] >= (1.0 - BEST_BATCH_TOLERANCE) * top)


# --- the raw phase of `make bench` ---------------------------------------------------------------------
CEILING_BATCHES = [1, 8]
BATCH_SWEEP = [1, 2, 4, 8]


def timing(phase: str, model: str, session: str, m: dict) -> OrtTiming:
    return OrtTiming(phase=phase, model=model, session=session, batch=m["batch"], img_per_s=m["img_per_s"],
                     ms_p50=m["batch_ms_p50"], cpu_ms_per_img=m["cpu_ms_per_img"], runs=m["runs"])


def phase_raw(plan, models: dict[str, Model]) -> list[Record]:
    """Both sessions of every model; sets each Model's best batch and writes the batch tables."""
    out: list[Record] = []
    best: dict[str, int] = {}
    device = "cpu"
    for name in plan.models:
        batches = plan.raw_batches(name)
        default_batches = CEILING_BATCHES if name in plan.full else [1]
        log(f"raw ORT {name}: server's session at {batches}, default session at {default_batches}")
        r = measure_model(plan.repo / name, batches, plan.raw_s, default_batches=default_batches)
        device = r["device"]
        b = best_batch(r)
        # Written only where the measurement brackets the optimum: the full sweep, or a short
        # sweep whose throughput already falls at its largest size.
        models[name].best_batch, models[name].best_batch_written = b, name in plan.full or b < max(batches)
        if models[name].best_batch_written:
            best[name] = b
        out += [timing("raw", name, "server", m) for m in r["batches"].values()]
        out += [timing("raw", name, "default", m) for m in r["default"]["batches"].values()]
        log("  server's: " + ", ".join(f"b{k} {v['img_per_s']:.1f}" for k, v in r["batches"].items())
            + f" img/s (best {b}); default: " + ", ".join(f"b{k} {v['img_per_s']:.1f}" for k, v in r["default"]["batches"].items()))
        gc.collect()
    out.append(write_batch_sizes(plan.repo, device, best))
    # `make serve` reads models/: the sizes measured here hold for any weights of the same variant.
    served = ROOT / "models"
    if not plan.quick and served.is_dir() and served.resolve() != plan.repo.resolve():
        out.append(write_batch_sizes(served, device, best))
    return out


def write_batch_sizes(repo: Path, device: str, best: dict[str, int]) -> BatchTable:
    from effnet_serve.core.config import BATCH_SIZES_FILE, write_batch_table

    write_batch_table(repo, device, best)
    return BatchTable(path=str(repo / BATCH_SIZES_FILE), device=device, written=best)
