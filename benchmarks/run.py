"""`python -m benchmarks.run`: ONNX Runtime's default session (the ceiling), the server's session, the
service, its peers and Triton's perf_analyzer, one run, one machine.

    python -m benchmarks.run                  # full run (make bench) -> docs/benchmarks.{jsonl,md,png}
    python -m benchmarks.run --quick          # smoke mode: tiny models, ~1 s per measurement, temp output
    python -m benchmarks.run --phases raw --models b0   # a partial run while developing

Phases, in order (one left out by --phases reads "not run"):
  raw      default session (batch 1 and 8 for the matrix models, 1 for the rest) beside the server's
           session (batch 1, 2, 4, 8 / 1, 2); the server's best batch goes to <repo>/batch_sizes.json
  service  `effnet serve` with b0..b7 loaded: a burst of photos on each (memory), then b0 and b4 at 1 and 32
           clients on model-resolution JPEGs and 1920x1080 photos; b0 also with the peers' multipart body
  perf     Triton's perf_analyzer against the same server: b0, binary FP32 tensors, HTTP (and gRPC if any)
  peers    LitServe, the FastAPI + ORT server, PyTriton (benchmarks/peers), b0 at 32 clients, same JPEGs

Modules: benchmarks.raw_ort (raw), benchmarks.phase_service (service, perf), benchmarks.phase_peers (peers); the
records: benchmarks.records (appended to <out>/benchmarks.jsonl); the report: benchmarks.report, its targets:
benchmarks.targets. Settled comparisons that used to be phases here (ORT arena settings, SAME vs symmetric
padding, preprocessing alone, a naive PyTorch server) are in docs/benchmarks-history.md. Models are built into a
persistent repository (.cache/bench-repo) the first time; building (and PyTriton's venv) is not part of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import (ALL_B, DEFAULT_REPO, DOCS, QUICK_CACHE, QUICK_MODELS, ROOT, build_models, cpu_busy_s, own_cpu_s,
                                has_model, log, make_inputs)
from benchmarks.raw_ort import BATCH_SWEEP
from benchmarks.records import Model, Record, Run

PHASES = ("raw", "service", "perf", "peers")
PEERS = ("litserve", "fastapi", "pytriton")


@dataclass
class Plan:
    quick: bool
    repo: Path
    out: Path
    work: Path
    models: list[str]  # raw ORT
    full: list[str]  # the matrix: batch sweep, service; full[0] is the headline (peers, perf)
    memory: list[str]  # loaded into the service
    phases: list[str]
    concurrency: list[int]
    peers: list[str]
    raw_s: float
    load_s: float
    warmup_s: float
    burst_s: float
    burst_clients: int
    grace_s: float  # how long the load generator waits for the answers in flight when a window closes
    perf_batch: int
    perf_concurrency: int
    perf_interval_ms: int
    perf_trials: int
    pytriton_python: str | None = None
    pytriton_note: str = ""

    def raw_batches(self, model: str) -> list[int]:
        # The full sweep for the matrix models; 1 and 2 for the rest, enough to see whether
        # batching helps at all (on 2 cores it does not for the big ones).
        return BATCH_SWEEP if model in self.full else [1, 2]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny models, ~1 s per measurement, output to a temp dir")
    p.add_argument("--models", help="models measured with raw ORT (default b0..b7; quick: tiny,tiny2)")
    p.add_argument("--full-matrix", help="models that also get the batch sweep and the service matrix; the "
                                         "first is the headline model (peers, perf_analyzer) (default: those of "
                                         "--models among b0,b4; quick: all)")
    p.add_argument("--memory-models", help="models loaded into the service (default b0..b7; quick: the quick models)")
    p.add_argument("--repo", type=Path, help=f"model repository (default {DEFAULT_REPO.relative_to(ROOT)}; quick: a temp copy)")
    p.add_argument("--out", type=Path, help="where benchmarks.{jsonl,md,png} go (default docs/; quick: a temp dir)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    p.add_argument("--peers", help=f"comma list of {','.join(PEERS)} (default all; quick: litserve,fastapi)")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--duration", type=float, help="seconds per load window (default 6; quick 1)")
    p.add_argument("--raw-seconds", type=float, help="seconds per raw ORT batch size (default 2.5; quick 0.3)")
    p.add_argument("--no-build", action="store_true", help="fail instead of building missing models")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    quick = args.quick
    models = split(args.models) if args.models else (list(QUICK_MODELS) if quick else list(ALL_B))
    if args.full_matrix:
        full = split(args.full_matrix)
    else:
        full = list(models) if quick else [m for m in ("b0", "b4") if m in models] or models[:1]
    models = list(dict.fromkeys(full + models))
    memory = split(args.memory_models) if args.memory_models else (list(QUICK_MODELS) if quick else list(ALL_B))
    memory = list(dict.fromkeys(memory + full))
    phases = split(args.phases)
    if unknown := set(phases) - set(PHASES):
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    peers = split(args.peers) if args.peers else (["litserve", "fastapi"] if quick else list(PEERS))
    if unknown := set(peers) - set(PEERS):
        raise SystemExit(f"unknown peers: {', '.join(sorted(unknown))}")
    if quick:
        out = args.out or Path(tempfile.mkdtemp(prefix="effnet-bench-quick-"))
        if out.resolve() == DOCS.resolve():
            raise SystemExit("--quick never writes to docs/: its numbers are meaningless")
    else:
        out = args.out or DOCS
    work = Path(tempfile.mkdtemp(prefix="effnet-bench-work-"))
    repo = args.repo or (work / "repo" if quick else DEFAULT_REPO)
    return Plan(
        quick=quick, repo=repo, out=out, work=work, models=models, full=full, memory=memory, phases=phases,
        concurrency=[int(c) for c in split(args.concurrency)], peers=peers,
        raw_s=args.raw_seconds if args.raw_seconds is not None else (0.3 if quick else 2.5),
        load_s=args.duration if args.duration is not None else (1.0 if quick else 6.0),
        warmup_s=0.5 if quick else 1.0,
        burst_s=0.5 if quick else 1.0, burst_clients=4,
        grace_s=2.0 if quick else 60.0,
        perf_batch=8, perf_concurrency=4, perf_interval_ms=500 if quick else 3000, perf_trials=3 if quick else 5,
    )


def prepare_repo(plan: Plan, allow_build: bool, temp_repo: bool) -> tuple[dict[str, dict], float]:
    """Build what is missing; returns each model's manifest and the seconds spent building."""
    needed = list(dict.fromkeys(plan.models + plan.memory))
    build_s = 0.0
    if temp_repo:
        # Build once into a persistent cache, then copy: the benchmark writes batch_sizes.json into
        # its repository, and the smoke run must not touch any repository but its own.
        build_s += build_models(QUICK_CACHE, [n for n in needed if n in QUICK_MODELS], allow_build)
        plan.repo.mkdir(parents=True, exist_ok=True)
        for n in needed:
            if n in QUICK_MODELS and not has_model(plan.repo, n):
                shutil.copytree(QUICK_CACHE / n, plan.repo / n)
    build_s += build_models(plan.repo, needed, allow_build)
    manifests = {n: json.loads((plan.repo / n / "manifest.json").read_text()) for n in needed if has_model(plan.repo, n)}
    return manifests, build_s


def run_record(plan: Plan, argv: list[str]) -> Run:
    from effnet_serve.core.config import Settings
    from benchmarks.blocks import machine_info

    s = Settings()
    return Run(command=" ".join(["python -m benchmarks.run", *argv]), quick=plan.quick, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               machine=machine_info(), models=plan.models, full=plan.full, loaded=plan.memory, phases=plan.phases,
               concurrency=plan.concurrency, window_s=plan.load_s, warmup_s=plan.warmup_s, raw_s=plan.raw_s, repo=str(plan.repo),
               threads=s.threads, ort_arena=s.ort_arena, ort_spinning=s.ort_spinning, burst_clients=plan.burst_clients,
               burst_s=plan.burst_s, perf_interval_ms=plan.perf_interval_ms,
               perf_trials=plan.perf_trials, loadavg=[os.getloadavg()[0]])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = make_plan(args)
    from benchmarks import phase_peers, phase_service, raw_ort, report

    run = run_record(plan, argv)
    manifests, run.build_s = prepare_repo(plan, allow_build=not args.no_build, temp_repo=plan.quick and args.repo is None)
    if missing := [m for m in plan.models if m not in manifests]:
        raise SystemExit(f"models not in {plan.repo}: {', '.join(missing)}")
    if "peers" in plan.phases and "pytriton" in plan.peers:
        t0 = time.perf_counter()
        plan.pytriton_python, plan.pytriton_note = phase_peers.setup_pytriton()
        run.pytriton_setup_s = time.perf_counter() - t0

    # The server tunes malloc at start-up; do the same here so that raw ORT runs under the service's allocator settings.
    from effnet_serve.api.server import tune_malloc

    tune_malloc()
    t_run, busy0, own0 = time.perf_counter(), cpu_busy_s(), own_cpu_s()
    inputs = make_inputs(plan.work, plan.full, manifests)
    models = {n: Model(name=n, px=m["preprocess"]["crop"], macs=m["macs"], params=m.get("params"))
              for n, m in manifests.items() if n in plan.models or n in plan.memory}
    records: list[Record] = []
    steps = [("raw", lambda: raw_ort.phase_raw(plan, models)),
             ("service", lambda: phase_service.phase_service(plan, inputs)),
             ("peers", lambda: phase_peers.phase_peers(plan, inputs))]
    for phase, fn in steps:
        if phase in plan.phases or (phase == "service" and "perf" in plan.phases):
            records += fn()
    run.run_s = time.perf_counter() - t_run
    # What else used the cores meanwhile: the machine's busy time less ours (this process and its children).
    run.others_cpu_pct = max(0.0, 100.0 * ((cpu_busy_s() - busy0) - (own_cpu_s() - own0)) / run.run_s)
    run.loadavg.append(os.getloadavg()[0])
    run.finished = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    plan.out.mkdir(parents=True, exist_ok=True)
    paths = report.write(plan.out, run.started, [run, *models.values(), *records])
    log(f"run took {run.run_s:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    shutil.rmtree(plan.work, ignore_errors=True)  # inputs, logs and the quick repo; kept when the run fails
    return 0


if __name__ == "__main__":
    sys.exit(main())
