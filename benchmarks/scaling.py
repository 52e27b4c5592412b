"""`make bench-scaling`: what front-end worker processes buy, beside the peers and the same work without a
server, in one run on one machine.

    python -m benchmarks.scaling                    # -> docs/benchmarks-scaling.json + <!-- scaling --> block
    python -m benchmarks.scaling --quick --out DIR  # smoke: tiny only, short windows, never docs/
    python -m benchmarks.scaling --render           # the block again from docs/benchmarks-scaling.json

Contenders, each an `effnet serve` (or peer) process group of its own, all started before a case is measured:
  service, 1 worker     EFFNET_WORKERS=1 (one process)
  service, N workers    EFFNET_WORKERS=N, N = the cores of this machine (one engine + N front ends)
  LitServe, 1 | 2       benchmarks/peers/litserve_server.py with 1 and 2 inference workers (best of two)
  serverless            benchmarks/serverless.py: the same JPEG decoded with Pillow in 2 threads while a default
                        ORT session runs batches of 8, in one process (no HTTP): the ceiling
Cases: tiny (80 px JPEG, 64 clients), b0 (256 px JPEG, 32 clients), b0 on a 1920x1080 photo (32 clients),
b4 (412 px JPEG, 32 clients) over HTTP; and the service's gRPC tensors (perf_analyzer, batch 1, 16 in flight).
Measured in alternating blocks: while one contender runs, every other one is frozen (SIGSTOP: LitServe's
idle workers poll), and each contender gets ROUNDS windows; its figure is the median. Servers use their
defaults (threads, decode workers, access log).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import perf_analyzer as pa
from benchmarks.harness import (DEFAULT_REPO, MULTIPART_TYPE, QUICK_CACHE, ROOT, Process, build_models, free_port,
                                loadgen, log, python_env, write_photo)
from benchmarks.peers.payloads import multipart_body
from benchmarks.blocks import block_main, machine_info

PEERS_DIR = ROOT / "benchmarks" / "peers"


@dataclass
class Case:
    key: str
    model: str
    image: str  # "NNpx" (a centre square at that size) or "photo" (1920x1080)
    clients: int
    contenders: list[str]
    rows: dict[str, list[float]] = field(default_factory=dict)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def jpeg(work: Path, image: str) -> Path:
    from PIL import Image
    from skimage import data as skdata

    if image == "photo":
        return write_photo(work / "photo-1920x1080.jpg")
    size = int(image.removesuffix("px"))
    src = Image.fromarray(skdata.chelsea())
    w, h = src.size
    s = min(w, h)
    path = work / f"chelsea-{size}px.jpg"
    src.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.Resampling.LANCZOS).save(
        path, quality=90)
    return path


class Contender:
    """One server (a process group) or the serverless pipeline (a process per window)."""

    def __init__(self, name: str, proc: Process | None = None, grpc_port: int | None = None) -> None:
        self.name, self.proc, self.grpc_port = name, proc, grpc_port

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.proc.stop()


def start_service(work: Path, repo: Path, model: str, workers: int, extra: dict[str, str] | None = None) -> Contender:
    env = {k: v for k, v in python_env().items() if not k.startswith("EFFNET_")}
    grpc = free_port()
    env.update(EFFNET_REPOSITORY=str(repo), EFFNET_MODELS=model, EFFNET_DEFAULT_MODEL=model, EFFNET_WORKERS=str(workers),
               EFFNET_GRPC_PORT=str(grpc), **(extra or {}))
    port = free_port()
    name = f"service, {workers} worker" + ("s" if workers > 1 else "")
    proc = Process(name, [sys.executable, "-m", "effnet_serve", "serve", "--host", "127.0.0.1", "--port", str(port)], env, port,
                   work / f"service-{model}-{workers}.log")
    proc.wait_ready(300)
    return Contender(name, proc, grpc)


def start_litserve(work: Path, repo: Path, model: str, workers: int) -> Contender:
    port = free_port()
    proc = Process(f"LitServe, {workers}", [sys.executable, str(PEERS_DIR / "litserve_server.py"), "--model-dir",
                                            str(repo / model), "--port", str(port), "--workers", str(workers)],
                   python_env(), port, work / f"litserve-{model}-{workers}.log", ready_path="/health",
                   stop_signal=signal.SIGINT)
    proc.wait_ready(120)
    return Contender(f"LitServe, {workers} worker" + ("s" if workers > 1 else ""), proc)


def serverless(repo: Path, model: str, image: Path, window_s: float) -> float:
    r = subprocess.run([sys.executable, "-m", "benchmarks.serverless", "--model-dir", str(repo / model), "--image",
                        str(image), "--duration", str(window_s)], env=python_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=window_s + 120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)["img_per_s"]


def window(c: Contender, case: Case, repo: Path, image: Path, body: Path, plan: argparse.Namespace) -> float:
    if c.name == "serverless":
        return serverless(repo, case.model, image, plan.window)
    if case.key.endswith("grpc"):
        r = pa.run(f"127.0.0.1:{c.grpc_port}", case.model, "grpc", 1, case.clients, int(plan.window * 1000), 3,
                   plan.work / "pa.csv", timeout=plan.window * 4 + 60, stability_pct=60)
        return float(r.get("img_per_s") or 0.0)
    service = c.name.startswith("service")
    url = c.proc.base + (f"/classify?model={case.model}" if service else "/predict")
    r = loadgen(url, body if not service else image, case.clients, plan.window, plan.warmup, 5.0,
                content_type=MULTIPART_TYPE if not service else "image/jpeg")
    return float(r.get("img_per_s") or 0.0)


def jpeg_and_multipart(work: Path, image_spec: str) -> tuple[Path, Path]:
    """The case's JPEG, and the same JPEG as the multipart body the peers take."""
    image = jpeg(work, image_spec)
    body = work / f"{image.stem}.multipart"
    data, ctype = multipart_body(image.read_bytes())
    assert ctype == MULTIPART_TYPE
    body.write_bytes(data)
    return image, body


def alternating(contenders: list[Contender], rounds: int, one: Callable[[Contender], Any], label: str) -> dict[str, list]:
    """`one(c)` for each contender in turn, `rounds` times, every other contender frozen (SIGSTOP) meanwhile:
    one after the other instead, the machine's drift alone moves ratios by ±15% here."""
    rows: dict[str, list] = {}
    for c in contenders:
        c.signal(signal.SIGSTOP)
    try:
        for rnd in range(rounds):
            for c in contenders:
                c.signal(signal.SIGCONT)
                time.sleep(0.3)
                try:
                    value = one(c)
                finally:
                    c.signal(signal.SIGSTOP)
                rows.setdefault(c.name, []).append(value)
                log(f"{label} round {rnd + 1}: {c.name}: {value}")
    finally:
        for c in contenders:
            c.signal(signal.SIGCONT)
    return rows


def measure(case: Case, contenders: list[Contender], repo: Path, work: Path, plan: argparse.Namespace) -> None:
    image, body = jpeg_and_multipart(work, case.image)
    case.rows = alternating(contenders, plan.rounds, lambda c: window(c, case, repo, image, body, plan), case.key)


def run(plan: argparse.Namespace) -> dict:
    n = cores()
    many = f"service, {n} workers"
    cases = [
        Case("tiny http", "tiny", "80px", 64, ["service, 1 worker", many, "LitServe, 1 worker", "LitServe, 2 workers", "serverless"]),
        Case("tiny grpc", "tiny", "80px", 16, ["service, 1 worker", many]),
    ]
    if not plan.quick:
        cases += [
            Case("b0 http", "b0", "256px", 32, ["service, 1 worker", many, "LitServe, 1 worker", "LitServe, 2 workers", "serverless"]),
            Case("b0 photo", "b0", "photo", 32, ["service, 1 worker", many, "LitServe, 1 worker", "LitServe, 2 workers"]),
            Case("b0 grpc", "b0", "256px", 16, ["service, 1 worker", many]),
            Case("b4 http", "b4", "412px", 32, ["service, 1 worker", many]),
            Case("b4 grpc", "b4", "412px", 16, ["service, 1 worker", many]),
        ]
    repos = {"tiny": QUICK_CACHE, "b0": DEFAULT_REPO, "b4": DEFAULT_REPO}
    build_models(QUICK_CACHE, ["tiny"], True)
    if not plan.quick:
        build_models(DEFAULT_REPO, ["b0", "b4"], True)
    t0 = time.perf_counter()
    for model in dict.fromkeys(c.model for c in cases):
        mine = [c for c in cases if c.model == model]
        wanted = {name for c in mine for name in c.contenders}
        started: dict[str, Contender] = {}
        try:
            for name in wanted:
                if name == "serverless":
                    started[name] = Contender("serverless")
                elif name.startswith("service"):
                    started[name] = start_service(plan.work, repos[model], model, 1 if name.endswith("1 worker") else n)
                else:
                    started[name] = start_litserve(plan.work, repos[model], model, int(name.split(", ")[1].split()[0]))
            for case in mine:
                measure(case, [started[name] for name in case.contenders], repos[model], plan.work, plan)
        finally:
            for c in started.values():
                c.stop()
    return {"cases": [{"case": c.key, "model": c.model, "image": c.image, "clients": c.clients,
                       "img_per_s": {k: round(statistics.median(v), 1) for k, v in c.rows.items()},
                       "windows": {k: [round(x, 1) for x in v] for k, v in c.rows.items()}} for c in cases],
            "workers": n, "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info(),
            "rounds": plan.rounds, "window_s": plan.window}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


# (case, what the default worker count is divided by, the goal)
GOALS = [("tiny http", "service, 1 worker", 1.7), ("tiny http", "LitServe", 1.5), ("b0 http", "serverless", 0.85),
         ("b0 http", "LitServe", 1.3), ("b0 photo", "LitServe", 2.0)]


def goal_line(result: dict, case: str, baseline: str, goal: float) -> str:
    row = next((c for c in result["cases"] if c["case"] == case), None)
    if row is None:
        return f"- {case}: not measured in this run"
    v = row["img_per_s"]
    mine = v.get(f"service, {result['workers']} workers")
    base = max([x for k, x in v.items() if k.startswith(baseline)], default=None)
    if not mine or not base:
        return f"- {case} against {baseline}: not measured in this run"
    got = mine / base
    return f"- {case}: {got:.2f}× {baseline} (goal ≥ {goal:g}×): **{'met' if got >= goal else 'missed'}**"


def render(result: dict) -> str:
    n = result["workers"]
    many = f"service, {n} workers"
    m = result["machine"]
    lines = ["<!-- scaling -->", "## Worker processes: scaling beside the peers", "",
             f"`make bench-scaling` (`python -m benchmarks.scaling`), {result['seconds']:.0f} s, on {m.get('cpu')} "
             f"({m.get('cores')} cores, {m.get('isa', '')}). Images per second, median of {result['rounds']} "
             f"windows of {result['window_s']:g} s per contender, measured in alternating blocks with every other "
             "contender frozen (SIGSTOP). Servers run with their defaults.", "",
             "| case | clients | " + " | ".join(["service, 1 worker", many, "LitServe (best of 1, 2 workers)", "serverless"])
             + f" | {n} workers / 1 | {n} workers / LitServe | {n} workers / serverless |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in result["cases"]:
        v = c["img_per_s"]
        ls = max([v[k] for k in v if k.startswith("LitServe")], default=None)
        cells = [v.get("service, 1 worker"), v.get(many), ls, v.get("serverless")]
        lines.append(f"| {c['case']} ({c['image']}) | {c['clients']} | " + " | ".join("–" if x is None else f"{x:.0f}" for x in cells)
                     + f" | {ratio(cells[1], cells[0])} | {ratio(cells[1], ls)} | {ratio(cells[1], cells[3])} |")
    lines += ["", "Goals (the default worker count against each baseline):", ""]
    lines += [goal_line(result, *g) for g in GOALS]
    for c in result["cases"]:
        v = c["img_per_s"]
        ls = max([x for k, x in v.items() if k.startswith("LitServe")], default=None)
        if ls and v.get("serverless"):
            lines.append(f"- {c['case']}: the same work without a server is {v['serverless'] / ls:.2f}× LitServe here, "
                         "so no server on this machine can be more than that ahead of it")
    lines += ["", "gRPC rows: the service's V2 gRPC endpoint with ready FP32 tensors, by Triton's perf_analyzer "
              "(batch 1, the clients column is its concurrency); LitServe and the serverless pipeline take JPEGs only.",
              "",
              f"Threads, as the service splits them by default with {n} workers: the engine's ONNX Runtime intra-op "
              f"pool gets EFFNET_THREADS = the cores ({m.get('cores')}); each worker decodes with cores / workers "
              "threads (at least 1) beside its event loop. That is the serverless pipeline's split (a default ORT "
              "session, which takes every core, beside a decode pool the size of the machine): decode and "
              "inference take turns on the same cores rather than each owning a fixed part of them, because the "
              "share each needs depends on the model (the tiny model is almost all front end, b4 almost all "
              "inference). EFFNET_THREADS and EFFNET_DECODE_WORKERS override either side.",
              "<!-- /scaling -->"]
    return "\n".join(lines)


def main() -> None:
    block_main("scaling", run, render, window_s=6.0)


if __name__ == "__main__":
    main()
