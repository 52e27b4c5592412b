"""The phases that run against `effnet serve` (one server process for all of them):

  service  all memory models loaded; a burst of photos on each (RSS); then the matrix models at N clients on
           model-resolution JPEGs and 1920x1080 photos as raw image/jpeg bodies, the headline model also with the
           multipart body the peers get; raw ORT's default session measured right next to the 1-client window
           (batch 1) and the top-N model-resolution window (batch 8); CPU per image by thread (stage)
  perf     Triton's perf_analyzer on the headline model: binary FP32 tensors over HTTP, and gRPC when the
           front end exists
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks import perf_analyzer
from benchmarks.harness import (MULTIPART_TYPE, ROOT, Process, batch_metrics, free_port, has_model, http_get, loadgen, log,
                                memory_kib, port_open, python_env)
from benchmarks.raw_ort import default_session, measure_one, model_file
from benchmarks.records import LoadWindow, PerfRow, Record, ServiceMemory

STAGES = ("event loop", "decode pool", "inference threads", "ORT workers", "engine loop", "other")
PROBE = ROOT / "benchmarks" / "probe"  # its sitecustomize names every thread of every process of the service


def stage_of(name: str | None, comm: str, process: str, split: bool) -> str:
    """Which stage a server thread belongs to. name: its Python name (None: a native thread); process: its process's
    multiprocessing name (effnet-engine, effnet-worker-N, MainProcess); split: the service runs worker processes."""
    if name is None:  # native: ORT's intra-op pool, unless libuv's or gRPC's own
        return "other" if comm.startswith(("libuv", "grpc")) else "ORT workers"
    if name == "MainThread":  # the engine's loop batches and serves the link; the supervisor's only supervises
        return "engine loop" if process == "effnet-engine" else "other" if split and process == "MainProcess" else "event loop"
    if name.startswith("decode"):
        return "decode pool"
    return "inference threads" if name.startswith("infer-") else "other"


def stage_cpu(row: dict, threadmaps: Path) -> dict[str, float]:
    """CPU ms per answered image, per stage, over the window, summed over every process of the service."""
    threads = row.get("server_threads")
    images = (row.get("img_per_s") or 0) * row["window_s"]
    if not threads or not images:
        return {}
    maps = {}
    for path in threadmaps.glob("*.json"):
        try:
            maps[int(path.stem)] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    split = any(m["process"] == "effnet-engine" for m in maps.values())
    out = dict.fromkeys(STAGES, 0.0)
    for tid, t in threads.items():
        m = maps.get(t["pid"], {"process": "?", "threads": {}})
        out[stage_of(m["threads"].get(tid), t["comm"], m["process"], split)] += 1000.0 * t["cpu_s"] / images
    return out


def ceiling(plan):
    """raw ORT's default session, kept in this process, measured next to a window -> the LoadWindow fields."""
    from effnet_serve.core.config import Settings

    threads, sessions = Settings().threads, {}

    def measure(name: str, batch: int) -> dict:
        if name not in sessions:
            path, iname, oname, crop = model_file(plan.repo / name)
            sessions[name] = (default_session(path, iname, oname, threads), crop)
        m = measure_one(*sessions[name], batch, plan.raw_s)
        return {"raw_batch": batch, "raw_img_per_s": m["img_per_s"], "raw_ms_p50": m["batch_ms_p50"]}
    return measure


def _window(plan, srv: Process, name: str, body: Path, ctype: str, n: int, threadmap: Path) -> dict:
    before = batch_metrics(srv.base)
    r = loadgen(f"{srv.base}/classify?model={name}", body, n, plan.load_s, plan.warmup_s, plan.grace_s,
                content_type=ctype, server_pgid=srv.pid, threads=True)
    after = batch_metrics(srv.base)
    (s0, c0), (s1, c1) = before.get(name, (0.0, 0.0)), after.get(name, (0.0, 0.0))
    r["mean_batch"] = (s1 - s0) / (c1 - c0) if c1 > c0 else None  # includes the warm-up
    r["stage_cpu_ms"] = stage_cpu(r, threadmap)
    return r


def _matrix(plan, srv: Process, inputs: dict[str, Path], threadmap: Path) -> list[LoadWindow]:
    raw_next_to = ceiling(plan)
    rows = []
    top_n = max(plan.concurrency)
    cells = [(m, kind, "raw", n) for m in plan.full for kind in ("model-res", "photo") for n in plan.concurrency]
    cells += [(plan.full[0], kind, "multipart", top_n) for kind in ("model-res", "photo")]
    for name, kind, body_kind, n in cells:
        key = name if kind == "model-res" else "photo"
        body = inputs[key] if body_kind == "raw" else inputs[f"{key}:multipart"]
        ctype = "image/jpeg" if body_kind == "raw" else MULTIPART_TYPE
        # This shared VM drifts by 5-10% over minutes: the raw numbers a window is judged against are
        # measured right next to it (the server idles meanwhile).
        adjacent = {}
        if n == 1 and kind == "model-res" and body_kind == "raw":
            adjacent = raw_next_to(name, 1)
        r = _window(plan, srv, name, body, ctype, n, threadmap)
        if n == top_n and kind == "model-res" and body_kind == "raw":
            adjacent = raw_next_to(name, 8)
        rows.append(LoadWindow.of(r, server="service", model=name, kind=kind, body=body_kind, body_bytes=body.stat().st_size,
                                  mean_batch=r["mean_batch"], stage_cpu_ms=r["stage_cpu_ms"], **adjacent))
        log(f"  {name} {kind:9} {body_kind:9} N={n:<3} {r['img_per_s'] or 0:7.1f} img/s  p50 {r['p50_ms'] or 0:7.1f} ms  "
            f"p99 {r['p99_ms'] or 0:7.1f} ms  errors {r['errors']}  server CPU {r['server_cpu_pct'] or 0:.0f}%")
    return rows


def _perf(plan, srv: Process, grpc_port: int, max_batch: int | None) -> list[Record]:
    name = plan.full[0]
    batch = min(plan.perf_batch, max_batch or plan.perf_batch)
    crop = model_file(plan.repo / name)[3]
    kw = dict(batch=batch, concurrency=plan.perf_concurrency, interval_ms=plan.perf_interval_ms,
              max_trials=plan.perf_trials, timeout=plan.perf_interval_ms / 1000 * plan.perf_trials * 3 + 60)
    log(f"perf_analyzer: {name}, batch {batch}, concurrency {plan.perf_concurrency}, HTTP binary tensors")
    runs = [perf_analyzer.run_stable(f"127.0.0.1:{srv.port}", name, "http", csv_path=plan.work / "pa-http.csv", **kw)]
    if not (ROOT / "app" / "api" / "grpc").is_dir():
        runs.append({"protocol": "grpc", "status": "not run: no gRPC front end (app/api/grpc does not exist)"})
    elif not port_open(grpc_port):
        runs.append({"protocol": "grpc", "status": f"not run: nothing listens on EFFNET_GRPC_PORT={grpc_port}"})
    else:
        log("perf_analyzer: gRPC")
        runs.append(perf_analyzer.run_stable(f"127.0.0.1:{grpc_port}", name, "grpc", csv_path=plan.work / "pa-grpc.csv", **kw))
    for r in runs:
        log(f"  {r['protocol']}: {r['status']}" + (f", {r['img_per_s']:.1f} img/s, p50 {r.get('p50_ms', 0):.1f} ms"
                                                    if r.get("img_per_s") else ""))
    return [PerfRow(protocol=r["protocol"], model=name, batch=batch, requested_batch=plan.perf_batch, concurrency=plan.perf_concurrency,
                    request_mb=batch * 3 * crop * crop * 4 / 1e6, status=r["status"], img_per_s=r.get("img_per_s"),
                    p50_ms=r.get("p50_ms"), p99_ms=r.get("p99_ms"), stable=r.get("stable"), stability_pct=r.get("stability_pct"),
                    command=r.get("command", ""), rc=r.get("rc", 0)) for r in runs]


def phase_service(plan, inputs: dict[str, Path]) -> list[Record]:
    loaded = [m for m in plan.memory if has_model(plan.repo, m)]
    port, grpc_port = free_port(), free_port()
    threadmap = plan.work / "threads"
    threadmap.mkdir()
    env = python_env()
    env.update(EFFNET_REPOSITORY=str(plan.repo), EFFNET_MODELS=",".join(loaded), EFFNET_DRAIN_S="2",
               EFFNET_GRPC_PORT=str(grpc_port), EFFNET_BENCH_THREADMAP=str(threadmap),
               PYTHONPATH=f"{PROBE}{os.pathsep}{env['PYTHONPATH']}")
    srv = Process("effnet serve", [sys.executable, "-m", "effnet_serve", "serve", "--host", "127.0.0.1", "--port", str(port)],
                  env, port, plan.work / "server.log")
    out: list[Record] = []
    try:
        log(f"service: loading {','.join(loaded)}")
        ready_s = srv.wait_ready(timeout=900)
        _, models_json = http_get(srv.base + "/models")
        try:
            listing = json.loads(models_json)
            listing = listing.get("models", listing) if isinstance(listing, dict) else listing
            max_batch = {m["name"]: m.get("max_batch") for m in listing}
        except (ValueError, TypeError, KeyError):
            max_batch = {}
        idle = memory_kib(srv.pid)["VmRSS"]
        log(f"  ready in {ready_s:.1f} s, RSS {idle / 1024:.0f} MiB")
        if "service" in plan.phases:
            for m in loaded:  # a burst of photos on every loaded model
                loadgen(f"{srv.base}/classify?model={m}", inputs["photo"], plan.burst_clients, plan.burst_s, 0.0, plan.grace_s)
            after_burst = memory_kib(srv.pid)["VmRSS"]
            log(f"  after a burst of photos on each model RSS {after_burst / 1024:.0f} MiB")
            out += _matrix(plan, srv, inputs, threadmap)
            after = memory_kib(srv.pid)
            log(f"  after the load RSS {after['VmRSS'] / 1024:.0f} MiB (peak {after['VmHWM'] / 1024:.0f} MiB)")
            out.append(ServiceMemory(models=loaded, ready_s=ready_s, max_batch=max_batch, idle_kib=idle,
                                     after_burst_kib=after_burst, after_load_kib=after["VmRSS"], hwm_kib=after["VmHWM"]))
        if "perf" in plan.phases:
            out += _perf(plan, srv, grpc_port, max_batch.get(plan.full[0]))
    finally:
        srv.stop(timeout=30)
    return out
