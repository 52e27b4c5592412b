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
import statistics
import time
from dataclasses import dataclass, field

from benchmarks.blocks import (SERVERLESS, Contender, alternating, block_main, cores, jpeg, ratio, start_litserve,
                               start_service, window)
from benchmarks.harness import DEFAULT_REPO, QUICK_CACHE, build_models


@dataclass
class Case:
    key: str
    model: str
    image: str  # "NNpx" (a centre square at that size) or "photo" (1920x1080)
    clients: int
    contenders: list[str]
    rows: dict[str, list[float]] = field(default_factory=dict)


def measure(case: Case, contenders: list[Contender], repo, plan: argparse.Namespace) -> None:
    image, body = jpeg(plan.work, case.image)
    one = lambda c: window(c, case.model, repo, case.key, case.clients, image, body, plan)["img_per_s"] or 0.0  # noqa: E731
    case.rows = alternating(contenders, plan.rounds, one, case.key)


def run(plan: argparse.Namespace) -> dict:
    n = cores()
    one, many, everyone = "service, 1 worker", f"service, {n} workers", ["LitServe, 1 worker", "LitServe, 2 workers"]
    cases = [Case("tiny http", "tiny", "80px", 64, [one, many, *everyone, SERVERLESS]), Case("tiny grpc", "tiny", "80px", 16, [one, many])]
    if not plan.quick:
        cases += [Case("b0 http", "b0", "256px", 32, [one, many, *everyone, SERVERLESS]),
                  Case("b0 photo", "b0", "photo", 32, [one, many, *everyone]), Case("b0 grpc", "b0", "256px", 16, [one, many]),
                  Case("b4 http", "b4", "412px", 32, [one, many]), Case("b4 grpc", "b4", "412px", 16, [one, many])]
    repos = {"tiny": QUICK_CACHE, "b0": DEFAULT_REPO, "b4": DEFAULT_REPO}
    build_models(QUICK_CACHE, ["tiny"], True)
    if not plan.quick:
        build_models(DEFAULT_REPO, ["b0", "b4"], True)
    t0 = time.perf_counter()
    for model in dict.fromkeys(c.model for c in cases):
        mine = [c for c in cases if c.model == model]
        started: dict[str, Contender] = {}
        try:
            for name in dict.fromkeys(name for c in mine for name in c.contenders):
                started[name] = (Contender(SERVERLESS) if name == SERVERLESS else
                                 start_service(plan.work, repos[model], model, 1 if name == one else n) if name.startswith("service")
                                 else start_litserve(plan.work, repos[model], model, int(name.split(", ")[1].split()[0])))
            for case in mine:
                measure(case, [started[name] for name in case.contenders], repos[model], plan)
        finally:
            for c in started.values():
                c.stop()
    return {"cases": [{"case": c.key, "model": c.model, "image": c.image, "clients": c.clients,
                       "img_per_s": {k: round(statistics.median(v), 1) for k, v in c.rows.items()},
                       "windows": {k: [round(x, 1) for x in v] for k, v in c.rows.items()}} for c in cases],
            "workers": n, "seconds": round(time.perf_counter() - t0, 1), "rounds": plan.rounds, "window_s": plan.window}


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
