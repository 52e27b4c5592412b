"""`make bench-quiet`: latency when the service is quiet, against the same work done without a server.

    python -m benchmarks.quiet                    # -> records in docs/benchmarks.jsonl, its section of benchmarks.md
    python -m benchmarks.quiet --quick --out DIR  # smoke: tiny only, short windows, never docs/

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
import sys
from dataclasses import dataclass, field

from benchmarks.blocks import (SERVERLESS, Contender, alternating, block_main, cores, jpeg, median_of, start_litserve,
                               start_service, window)
from benchmarks.harness import DEFAULT_REPO, QUICK_CACHE, build_models
from benchmarks.records import Latency

SERVICE, SPINNING, ONE, LITSERVE = "service", "service, no spinning", "service, 1 process", "LitServe, 1 worker"


@dataclass
class Case:
    key: str  # "http 1", "http 4", "grpc 1", "http 32"
    clients: int
    contenders: list[str]
    rows: dict[str, list[dict]] = field(default_factory=dict)  # contender -> windows of {"p50_ms", "p99_ms", "img_per_s"}


def cases() -> list[Case]:
    # The serverless pipeline right after the service: the goals pair their windows round by round (targets.paired).
    return [Case("http 1", 1, [SERVICE, SERVERLESS, SPINNING, ONE, LITSERVE]), Case("http 4", 4, [SERVICE, SERVERLESS, SPINNING, ONE]),
            Case("grpc 1", 1, [SERVICE, SERVERLESS, SPINNING, ONE]), Case("http 32", 32, [SERVICE, SPINNING])]


def start(name: str, work, repo, model: str) -> Contender:
    if name == SERVERLESS:
        return Contender(SERVERLESS)
    if name == LITSERVE:
        return start_litserve(work, repo, model, 1)
    return start_service(work, repo, model, 1 if name == ONE else cores(),
                         {"EFFNET_ORT_SPINNING": "off"} if name == SPINNING else {}, name=name)


def run(plan: argparse.Namespace) -> list[Latency]:
    models = ["tiny"] if plan.quick else ["b0", "lite0"]
    repo = QUICK_CACHE if plan.quick else DEFAULT_REPO
    build_models(repo, models, True)
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
        out += [Latency(model, case.key, case.clients, name, *(median_of(w, k) for k in ("p50_ms", "p99_ms", "img_per_s")), w)
                for case in mine for name, w in case.rows.items()]
    plan.settings = {"workers": cores(), "rounds": plan.rounds, "window_s": plan.window}
    return out


def main() -> int:
    return block_main("quiet", run, window_s=3.0, rounds=4)


if __name__ == "__main__":
    sys.exit(main())
