"""`make bench-quiet`: latency when the service is quiet, against the same work done without a server.

    python -m benchmarks.quiet                    # -> docs/benchmarks-quiet.json + <!-- quiet --> block
    python -m benchmarks.quiet --quick --out DIR  # smoke: tiny only, short windows, never docs/
    python -m benchmarks.quiet --render           # the block again from docs/benchmarks-quiet.json

A product behind an interactive page is judged by its latency at low load, not only by its throughput at
saturation. For b0 and lite0 (256 px JPEG; gRPC: ready FP32 tensors):
  1 client     one request at a time over one keep-alive connection: median and p99
  4 clients    four at once: median, against the serverless time for 4 images (4 decodes side by side and
               one batch of 4)
  32 clients   throughput, to show what spinning within runs costs under load
Contenders, all started before a model is measured, each frozen (SIGSTOP) while another runs:
  service                the default (EFFNET_WORKERS = cores, EFFNET_ORT_SPINNING=auto: b0 and lite0 spin
                         within their runs)
  service, no spinning   the same with EFFNET_ORT_SPINNING=off (the default before)
  service, 1 process     EFFNET_WORKERS=1
  LitServe, 1 worker     benchmarks/peers/litserve_server.py (1 client only)
  serverless             benchmarks/serverless.py --latency N: Pillow + a default ORT session in one process
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import perf_analyzer as pa
from benchmarks.harness import DEFAULT_REPO, MULTIPART_TYPE, QUICK_CACHE, ROOT, build_models, loadgen, python_env
from benchmarks.blocks import block_main, machine_info
from benchmarks.scaling import Contender, alternating, cores, jpeg_and_multipart, start_litserve, start_service

SERVICE, SPINNING, ONE = "service", "service, no spinning", "service, 1 process"
LITSERVE, SERVERLESS = "LitServe, 1 worker", "serverless"


@dataclass
class Case:
    key: str  # "http 1", "http 4", "grpc 1", "http 32"
    clients: int
    contenders: list[str]
    # contender -> windows of {"p50_ms", "p99_ms", "img_per_s"}
    rows: dict[str, list[dict]] = field(default_factory=dict)


def cases() -> list[Case]:
    return [
        Case("http 1", 1, [SERVICE, SPINNING, ONE, LITSERVE, SERVERLESS]),
        Case("http 4", 4, [SERVICE, SPINNING, ONE, SERVERLESS]),
        Case("grpc 1", 1, [SERVICE, SPINNING, ONE, SERVERLESS]),
        Case("http 32", 32, [SERVICE, SPINNING]),
    ]


def serverless(repo: Path, model: str, image: Path, images: int, window_s: float, tensors: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.serverless", "--model-dir", str(repo / model), "--image", str(image),
           "--duration", str(window_s), "--latency", str(images)]
    r = subprocess.run(cmd + (["--tensors"] if tensors else []), env=python_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=window_s + 120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)


def window(c: Contender, case: Case, model: str, repo: Path, image: Path, body: Path, plan: argparse.Namespace) -> dict:
    if c.name == SERVERLESS:
        return serverless(repo, model, image, case.clients, plan.window, tensors=case.key.startswith("grpc"))
    if case.key.startswith("grpc"):
        r = pa.run(f"127.0.0.1:{c.grpc_port}", model, "grpc", 1, case.clients, int(plan.window * 1000), 3,
                   plan.work / "pa.csv", timeout=plan.window * 4 + 60, stability_pct=60)
        return {k: r.get(k) for k in ("p50_ms", "p99_ms", "img_per_s")}
    service = c.name.startswith("service")
    url = c.proc.base + (f"/classify?model={model}" if service else "/predict")
    r = loadgen(url, image if service else body, case.clients, plan.window, plan.warmup, 5.0,
                content_type="image/jpeg" if service else MULTIPART_TYPE)
    return {k: r.get(k) for k in ("p50_ms", "p99_ms", "img_per_s")}


def measure(case: Case, model: str, started: dict[str, Contender], repo: Path, plan: argparse.Namespace) -> None:
    image, body = jpeg_and_multipart(plan.work, "256px")
    case.rows = alternating([started[name] for name in case.contenders], plan.rounds,
                            lambda c: window(c, case, model, repo, image, body, plan), f"{model} {case.key}")


def start(name: str, work: Path, repo: Path, model: str) -> Contender:
    if name == SERVERLESS:
        return Contender(SERVERLESS)
    if name == LITSERVE:
        return start_litserve(work, repo, model, 1)
    workers = 1 if name == ONE else cores()
    extra = {"EFFNET_ORT_SPINNING": "off"} if name == SPINNING else {}
    c = start_service(work, repo, model, workers, extra)
    c.name = name
    return c


def median_of(windows: list[dict], key: str) -> float | None:
    values = [w[key] for w in windows if w.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def run(plan: argparse.Namespace) -> dict:
    models = ["tiny"] if plan.quick else ["b0", "lite0"]
    repo = QUICK_CACHE if plan.quick else DEFAULT_REPO
    build_models(repo, models, True)
    t0 = time.perf_counter()
    out = []
    for model in models:
        mine = cases()
        started: dict[str, Contender] = {}
        try:
            for name in dict.fromkeys(n for c in mine for n in c.contenders):
                started[name] = start(name, plan.work, repo, model)
            for case in mine:
                measure(case, model, started, repo, plan)
        finally:
            for c in started.values():
                c.stop()
        for case in mine:
            out.append({"model": model, "case": case.key, "clients": case.clients,
                        "p50_ms": {k: median_of(v, "p50_ms") for k, v in case.rows.items()},
                        "p99_ms": {k: median_of(v, "p99_ms") for k, v in case.rows.items()},
                        "img_per_s": {k: median_of(v, "img_per_s") for k, v in case.rows.items()},
                        "windows": case.rows})
    return {"cases": out, "workers": cores(), "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info(),
            "rounds": plan.rounds, "window_s": plan.window}


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def goals(result: dict) -> list[str]:
    lines = []
    for c in result["cases"]:
        p50, p99, base = c["p50_ms"], c["p99_ms"], c["p50_ms"].get(SERVERLESS)
        if c["case"] == "http 1" and base:
            got, tail = p50.get(SERVICE), p99.get(SERVICE)
            lines.append(f"- {c['model']}, 1 client: median {_x(got, base)} serverless (goal ≤ 1.15×): "
                         f"**{'met' if got and got <= 1.15 * base else 'missed'}**; p99 {_x(tail, base)} its median "
                         f"(goal ≤ 1.5×): **{'met' if tail and tail <= 1.5 * base else 'missed'}**")
        if c["case"] == "http 4" and base:
            got = p50.get(SERVICE)
            lines.append(f"- {c['model']}, 4 clients: median {_x(got, base)} the serverless time for 4 images "
                         f"(goal ≤ 1.3×): **{'met' if got and got <= 1.3 * base else 'missed'}**")
    return lines


def render(result: dict) -> str:
    m = result["machine"]
    names = [SERVICE, SPINNING, ONE, LITSERVE, SERVERLESS]
    lines = ["<!-- quiet -->", "## Latency when the service is quiet", "",
             f"`make bench-quiet` (`python -m benchmarks.quiet`), {result['seconds']:.0f} s, on {m.get('cpu')} "
             f"({m.get('cores')} cores, {m.get('isa', '')}). Median of {result['rounds']} windows of "
             f"{result['window_s']:g} s per contender, in alternating blocks with every other contender frozen "
             f"(SIGSTOP). `service` is the default ({result['workers']} workers, ORT spinning within runs: `EFFNET_ORT_SPINNING=auto`); the serverless "
             "pipeline decodes the same JPEG with Pillow and runs a default ONNX Runtime session in one process "
             "(gRPC rows: the tensor only), N images side by side then one batch of N.", "",
             "| model | case | " + " | ".join(f"{n} p50 / p99 ms" for n in names) + " | service / serverless (p50) |",
             "| --- | --- | " + " | ".join("---:" for _ in names) + " | ---: |"]
    for c in result["cases"]:
        if c["case"] == "http 32":
            continue
        cells = [f"{_ms(c['p50_ms'].get(n))} / {_ms(c['p99_ms'].get(n))}" if n in c["p50_ms"] else "–" for n in names]
        lines.append(f"| {c['model']} | {c['case']} client{'s' if c['clients'] > 1 else ''} | " + " | ".join(cells)
                     + f" | {_x(c['p50_ms'].get(SERVICE), c['p50_ms'].get(SERVERLESS))} |")
    lines += ["", "Spinning under load (32 clients, images per second):", ""]
    for c in result["cases"]:
        if c["case"] == "http 32":
            on, off = c["img_per_s"].get(SERVICE), c["img_per_s"].get(SPINNING)
            lines.append(f"- {c['model']}: spinning within runs {on}, off {off} ({_x(on, off)})")
    lines += ["", "Goals (issue 27):", "", *goals(result), "<!-- /quiet -->"]
    return "\n".join(lines)


def main() -> None:
    block_main("quiet", run, render, window_s=5.0)


if __name__ == "__main__":
    main()
