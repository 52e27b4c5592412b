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
import time
from dataclasses import dataclass, field

from benchmarks.blocks import (SERVERLESS, Contender, alternating, block_main, cores, jpeg, median_of, start_litserve,
                               start_service, window)
from benchmarks.blocks import ratio as _x
from benchmarks.harness import DEFAULT_REPO, QUICK_CACHE, build_models

SERVICE, SPINNING, ONE, LITSERVE = "service", "service, no spinning", "service, 1 process", "LitServe, 1 worker"


@dataclass
class Case:
    key: str  # "http 1", "http 4", "grpc 1", "http 32"
    clients: int
    contenders: list[str]
    rows: dict[str, list[dict]] = field(default_factory=dict)  # contender -> windows of {"p50_ms", "p99_ms", "img_per_s"}


def cases() -> list[Case]:
    return [Case("http 1", 1, [SERVICE, SPINNING, ONE, LITSERVE, SERVERLESS]), Case("http 4", 4, [SERVICE, SPINNING, ONE, SERVERLESS]),
            Case("grpc 1", 1, [SERVICE, SPINNING, ONE, SERVERLESS]), Case("http 32", 32, [SERVICE, SPINNING])]


def start(name: str, work, repo, model: str) -> Contender:
    if name == SERVERLESS:
        return Contender(SERVERLESS)
    if name == LITSERVE:
        return start_litserve(work, repo, model, 1)
    return start_service(work, repo, model, 1 if name == ONE else cores(),
                         {"EFFNET_ORT_SPINNING": "off"} if name == SPINNING else {}, name=name)


def run(plan: argparse.Namespace) -> dict:
    models = ["tiny"] if plan.quick else ["b0", "lite0"]
    repo = QUICK_CACHE if plan.quick else DEFAULT_REPO
    build_models(repo, models, True)
    t0 = time.perf_counter()
    out = []
    image, body = jpeg(plan.work, "256px")
    for model in models:
        mine = cases()
        started: dict[str, Contender] = {}
        try:
            for name in dict.fromkeys(n for c in mine for n in c.contenders):
                started[name] = start(name, plan.work, repo, model)
            for case in mine:
                one = lambda c, case=case, model=model: window(c, model, repo, case.key, case.clients, image, body, plan, latency=True)  # noqa: E731
                case.rows = alternating([started[n] for n in case.contenders], plan.rounds, one, f"{model} {case.key}")
        finally:
            for c in started.values():
                c.stop()
        out += [{"model": model, "case": case.key, "clients": case.clients, "windows": case.rows,
                 **{k: {n: median_of(v, k) for n, v in case.rows.items()} for k in ("p50_ms", "p99_ms", "img_per_s")}}
                for case in mine]
    return {"cases": out, "workers": cores(), "seconds": round(time.perf_counter() - t0, 1), "rounds": plan.rounds,
            "window_s": plan.window}


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
