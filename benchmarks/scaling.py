"""`make bench-scaling`: what front-end worker processes buy, beside the peers and the same work without a
server, in one run on one machine.

    python -m benchmarks.scaling                    # -> records in docs/benchmarks.jsonl, its section of benchmarks.md
    python -m benchmarks.scaling --quick --out DIR  # smoke: tiny only, short windows, never docs/

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
import sys
from dataclasses import dataclass, field

from benchmarks.blocks import (SERVERLESS, Contender, alternating, block_main, cores, jpeg, median_of, start_litserve,
                               start_service, window)
from benchmarks.harness import DEFAULT_REPO, QUICK_CACHE, build_models
from benchmarks.records import Throughput


@dataclass
class Case:
    key: str
    model: str
    image: str  # "NNpx" (a centre square at that size) or "photo" (1920x1080)
    clients: int
    contenders: list[str]
    rows: dict[str, list[dict]] = field(default_factory=dict)  # contender -> its windows (blocks.window)


def measure(case: Case, contenders: list[Contender], repo, plan: argparse.Namespace) -> None:
    image, body = jpeg(plan.work, case.image)
    one = lambda c: window(c, case.model, repo, case.key, case.clients, image, body, plan)  # noqa: E731
    case.rows = alternating(contenders, plan.rounds, one, case.key)


def run(plan: argparse.Namespace) -> list[Throughput]:
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
    plan.settings = {"workers": n, "rounds": plan.rounds, "window_s": plan.window}
    return [Throughput(c.key, c.model, c.image, c.clients, k, round(statistics.median(w["img_per_s"] or 0.0 for w in v), 1),
                       [round(w["img_per_s"] or 0.0, 1) for w in v], median_of(v, "cores"))
            for c in cases for k, v in c.rows.items()]


def main() -> int:
    return block_main("scaling", run, window_s=6.0)


if __name__ == "__main__":
    sys.exit(main())
