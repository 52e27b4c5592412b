"""`make bench-reliability`: how fast the service gets through the reliability tests' hostile scenarios.

    python -m benchmarks.reliability                 # -> records in docs/benchmarks.jsonl, its section of benchmarks.md
    python -m benchmarks.reliability --quick --out DIR   # smoke mode: tiny model, short windows, never docs/

tests/reliability/ asserts what a correct server does at any speed (every refusal a 503 with Retry-After,
the queue within its bound, nothing lost, every probe answered); the speeds those tests used to gate on
depend on how busy the machine is, so they are measured here instead, on the same scenarios with the same
clients (tests/reliability/reliability_helpers.py, memory_burst.py, v2_flood.py), side by side in one run:

  storm    B0, queue 32: capacity at 16 closed-loop clients (before and after), then 256 clients that resend
           the moment they are refused: goodput against capacity, accepted p99 against two queue drains
  bursts   tiny, queue 8, batch 4, no admission wait: 80 clients in bursts of 64 accepted requests: accepted
           p99 against (queue / batch + 2) batch times, the batch time measured in the same bursts
  floods   /health/live latency (and a normal request's, for the stalled uploads) with nothing else running,
           while 300 uploads stall after their headers (tiny), and while the hostile /v2 flood runs (B0)
  memory   B0, 256 MB budget: the memory burst's peak RSS (summed over the service's processes) against the
           footprint and the budget

(perf_analyzer's stability in time windows, measured here until 2026-12-05, is settled: docs/benchmarks-history.md.)

Each scenario starts its own `effnet serve`. Models: B0 (random weights) in .cache/bench-repo, as `make bench`
builds it, and the tiny variant in .cache/bench-quick-models; built the first time, not part of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.blocks import Contender, block_main, cores, start_service
from benchmarks.harness import DEFAULT_REPO, QUICK_CACHE, ROOT, build_models, http_get, memory_kib, python_env
from benchmarks.loadgen import percentile
from benchmarks.records import Bursts, ClosedLoop, MemoryBurst, Probes, Record

RELIABILITY = ROOT / "tests" / "reliability"
sys.path.insert(0, str(RELIABILITY))  # the tests' own clients: the same scenarios, not look-alikes
import memory_burst  # noqa: E402
from reliability_helpers import LIVE_PROBE, Answer, closed_loop, encode, metric, real_photo, request_bytes  # noqa: E402


def ms(seconds: list[float], q: float) -> float | None:
    return None if not seconds else round(percentile(sorted(1000 * x for x in seconds), q), 1)


class Server:
    """`effnet serve` on one model with the given EFFNET_* settings (1 ORT and 1 decode thread unless they say)."""

    def __init__(self, plan: argparse.Namespace, name: str, repo: Path, model: str, settings: dict[str, str]) -> None:
        self.c: Contender = start_service(plan.work, repo, model, cores(), {"EFFNET_THREADS": "1", "EFFNET_DECODE_WORKERS": "1",
                                                                         "EFFNET_GRPC_PORT": "0", **settings}, name=name)
        self.proc = self.c.proc
        self.port, self.base, self.pid = self.proc.port, self.proc.base, self.proc.pid

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.c.stop()


async def window(port: int, request: bytes, clients: int, warmup: float, seconds: float) -> dict:
    """A closed loop measured over [warmup, warmup + seconds): goodput and accepted latencies."""
    answers: list[Answer] = []
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    await closed_loop(port, request, clients, answers, lambda: time.perf_counter() >= t_end)
    inside = [a for a in answers if a.t0 >= t_start and a.t1 <= t_end]
    ok = [a.t1 - a.t0 for a in inside if a.status == 200]
    return {"clients": clients, "seconds": seconds, "ok": len(ok), "refused": sum(a.status in (429, 503) for a in inside),
            "errors": sum(a.status not in (200, 429, 503) for a in inside), "goodput": len(ok) / seconds,
            "p50_ms": ms(ok, 50), "p99_ms": ms(ok, 99)}


# --- storm: test_rel_hostile_load.py's 16x overload ---------------------------------------------------
def storm(plan: argparse.Namespace) -> list[Record]:
    queue = 32
    photo = encode(real_photo((plan.crop, plan.crop)), "JPEG", quality=90)
    request = request_bytes(f"/classify?model={plan.model}", photo)
    w = plan.windows
    with Server(plan, "storm", plan.repo, plan.model, {"EFFNET_THREADS": "2", "EFFNET_DECODE_WORKERS": "2",
                                                       "EFFNET_MAX_QUEUE": str(queue)}) as srv:
        # Capacity before and after the storm (the check takes their mean): a shared VM's speed drifts within minutes.
        before = asyncio.run(window(srv.port, request, 16, w["warmup"], w["capacity"]))
        during = asyncio.run(window(srv.port, request, 256, w["warmup"], w["storm"]))
        after = asyncio.run(window(srv.port, request, 16, w["warmup"] / 2, w["capacity"]))
    return [ClosedLoop(k, plan.model, queue, **v) for k, v in (("before", before), ("storm", during), ("after", after))]


# --- bursts: test_rel_overload.py ---------------------------------------------------------------------
async def _burst(port: int, base: str, request: bytes, clients: int, accepted: int) -> dict:
    answers: list[Answer] = []
    counted = {"seen": 0, "ok": 0}

    def done() -> bool:
        for a in answers[counted["seen"]:]:
            counted["ok"] += a.status == 200
        counted["seen"] = len(answers)
        return counted["ok"] >= accepted

    before = http_get(base + "/metrics")[1]
    await closed_loop(port, request, clients, answers, done, 0.02)
    after = http_get(base + "/metrics")[1]
    ok = [a for a in answers if a.status == 200]
    return {"latencies": [a.t1 - a.t0 for a in ok], "span_s": max(a.t1 for a in ok) - min(a.t0 for a in ok),
            "refused": sum(a.status == 503 for a in answers),
            "batches": metric(after, "effnet_batch_size_count", model="tiny") - metric(before, "effnet_batch_size_count", model="tiny"),
            "images": metric(after, "effnet_batch_size_sum", model="tiny") - metric(before, "effnet_batch_size_sum", model="tiny")}


def bursts(plan: argparse.Namespace) -> list[Record]:
    queue, batch = 8, 4
    request = request_bytes("/classify", encode(real_photo((160, 106)), "JPEG", quality=90))
    settings = {"EFFNET_MAX_QUEUE": str(queue), "EFFNET_MAX_BATCH": str(batch), "EFFNET_MAX_DELAY_MS": "5",
                "EFFNET_ADMISSION_WAIT_MS": "0"}

    async def at_capacity(port: int) -> float:
        answers: list[Answer] = []
        t0 = time.perf_counter()
        await closed_loop(port, request, queue, answers, lambda: len(answers) >= 6 * queue)
        return len(answers) / (time.perf_counter() - t0)

    with Server(plan, "bursts", QUICK_CACHE, "tiny", settings) as srv:
        rps_before = asyncio.run(at_capacity(srv.port))
        asyncio.run(_burst(srv.port, srv.base, request, 10 * queue, 64))  # warm-up
        measured = [asyncio.run(_burst(srv.port, srv.base, request, 10 * queue, 64)) for _ in range(plan.bursts)]
        rps_after = asyncio.run(at_capacity(srv.port))
    latencies = [x for b in measured for x in b["latencies"]]
    n_batches = sum(b["batches"] for b in measured)
    batch_s = sum(b["span_s"] for b in measured) / n_batches
    mean_batch = sum(b["images"] for b in measured) / n_batches
    return [Bursts(queue, batch, 10 * queue, len(measured), len(latencies), sum(b["refused"] for b in measured),
                   ms(latencies, 50), ms(latencies, 99), round(1000 * batch_s, 1), round(mean_batch, 2),
                   round(1000 * (queue / mean_batch + 2) * batch_s, 1), round(rps_before),
                   round(len(latencies) / sum(b["span_s"] for b in measured)), round(rps_after))]


# --- floods: /health/live under the stalled uploads and under the hostile /v2 bodies -----------------------
def live_probes(url: str, count: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", LIVE_PROBE, url, str(count), "10"], capture_output=True, text=True,
                         timeout=count * 11 + 60, check=True, env=python_env()).stdout
    probes = json.loads(out)
    if any(status != 200 for status, _ in probes):
        raise RuntimeError(f"/health/live failed: {[p for p in probes if p[0] != 200][:5]}")
    return [s for _, s in probes]


def probes(scenario: str, when: str, what: str, seconds: list[float], **kw) -> Probes:
    return Probes(scenario, when, what, len(seconds), ms(seconds, 50), ms(seconds, 99), ms(seconds, 100), **kw)


def normal_requests(url: str, body: bytes, n: int) -> list[float]:
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/classify", content=body, headers={"content-type": "image/jpeg"})
            if r.status_code != 200:
                raise RuntimeError(f"a normal request got {r.status_code}: {r.text[:200]}")
            out.append(time.perf_counter() - t0)
    return out


def floods(plan: argparse.Namespace) -> list[Record]:
    n = plan.probes
    # 300 uploads that send their headers and 100 bytes, then nothing (test_rel_hostile.py). Here they are
    # held for the whole window (no upload-rate floor, a long body timeout) so every probe meets all of them.
    photo = encode(real_photo(), "JPEG", quality=90)
    settings = {"EFFNET_MAX_QUEUE": "32", "EFFNET_MIN_UPLOAD_KBPS": "0", "EFFNET_BODY_TIMEOUT_S": "300"}
    out = []
    with Server(plan, "stalled", QUICK_CACHE, "tiny", settings) as srv:
        out += [probes("stalled", "quiet", "live", live_probes(srv.base, n)),
                probes("stalled", "quiet", "request", normal_requests(srv.base, photo, 10))]
        head = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 200000\r\n\r\n"
                + b"\xff" * 100)
        stalled = []
        try:
            for _ in range(plan.settings["stalled_connections"]):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
                s.sendall(head)
                stalled.append(s)
            time.sleep(0.5)  # let them reach the server
            out += [probes("stalled", "held", "live", live_probes(srv.base, n)),
                    probes("stalled", "held", "request", normal_requests(srv.base, photo, 10))]
        finally:
            for s in stalled:
                s.close()
    settings = {"EFFNET_THREADS": "2", "EFFNET_DECODE_WORKERS": "2", "EFFNET_MAX_QUEUE": "32", "EFFNET_MAX_BODY_MB": "20"}
    with Server(plan, "v2flood", plan.repo, plan.model, settings) as srv:
        out.append(probes("v2 flood", "quiet", "live", live_probes(srv.base, n)))
        flood = subprocess.Popen([sys.executable, str(RELIABILITY / "v2_flood.py"), srv.base], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=python_env())
        try:
            if flood.stdout.readline().strip() != "flooding":
                raise RuntimeError("the /v2 flood got no answer")
            during = live_probes(srv.base, n)
            out.append(probes("v2 flood", "flood", "live", during, hostile=json.loads(flood.communicate(input="", timeout=300)[0])))
        finally:
            if flood.poll() is None:
                flood.kill()
    return out


# --- memory: test_rel_hostile_load.py's burst --------------------------------------------------------
def memory(plan: argparse.Namespace) -> list[Record]:
    budget_mb = memory_burst.BUDGET_MB
    settings = {"EFFNET_THREADS": "2", "EFFNET_DECODE_WORKERS": "2", **memory_burst.server_settings()}

    def clients(url: str, *what: str) -> dict:
        out = subprocess.run([sys.executable, str(RELIABILITY / "memory_burst.py"), url, *what], capture_output=True,
                             text=True, timeout=900, check=True, env=python_env()).stdout
        return json.loads(out)

    with Server(plan, "memory", plan.repo, plan.model, settings) as srv:
        start = memory_kib(srv.pid)
        warm = clients(srv.base, "warm")
        footprint = memory_kib(srv.pid)
        burst = clients(srv.base, "burst", "600", str(plan.memory_requests))
        peak = memory_kib(srv.pid)
        time.sleep(2.0)
        settled = memory_kib(srv.pid)
    kinds = burst["kinds"]
    # What the test allows over the footprint: the budget, the queue's preprocessed images, glibc's retention.
    allowed_mb = budget_mb + memory_burst.QUEUE * 3 * plan.crop ** 2 * 4 / 2**20 + 128
    return [MemoryBurst(plan.model, budget_mb, round(allowed_mb), round(start["VmRSS"] / 1024), round(footprint["VmHWM"] / 1024),
                        round(peak["VmHWM"] / 1024), round(settled["VmRSS"] / 1024), burst["seconds"],
                        {k: sum(v["final"].values()) for k, v in kinds.items()}, {k: sum(v["attempts"].values()) for k, v in kinds.items()},
                        {k: v["final"] for k, v in kinds.items()}, len(burst["bad_refusals"]), warm)]


def run(plan: argparse.Namespace) -> list[Record]:
    plan.repo = (plan.repo or QUICK_CACHE) if plan.quick else (plan.repo or DEFAULT_REPO)
    plan.model, plan.crop = ("tiny", 64) if plan.quick else ("b0", 224)
    plan.windows = {"warmup": 0.5, "capacity": 1.5, "storm": 2.0} if plan.quick else {"warmup": 2.0, "capacity": 6.0, "storm": 10.0}
    plan.bursts, plan.probes, plan.memory_requests = (2, 20, 1) if plan.quick else (5, 200, 3)
    plan.settings = {"stalled_connections": 300}
    build_models(QUICK_CACHE, ["tiny"], allow_build=True)
    build_models(plan.repo, [plan.model], allow_build=True)
    return [r for step in (storm, bursts, floods, memory) for r in step(plan)]


def main() -> int:
    return block_main("reliability", run, options=lambda p: p.add_argument(
        "--repo", type=Path, help=f"repository holding b0 (default {DEFAULT_REPO.relative_to(ROOT)})"))


if __name__ == "__main__":
    sys.exit(main())
