"""`make bench-reliability`: how fast the service gets through the reliability tests' hostile scenarios.

    python -m benchmarks.reliability                 # full run -> docs/benchmarks-reliability.json and the
                                                     # <!-- reliability --> block of docs/benchmarks.md
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
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (DEFAULT_REPO, DOCS, QUICK_CACHE, ROOT, Process, build_models, cpu_busy_s, own_cpu_s, free_port,
                                http_get, memory_kib, python_env)

RELIABILITY = ROOT / "tests" / "reliability"
sys.path.insert(0, str(RELIABILITY))  # the tests' own clients: the same scenarios, not look-alikes
import memory_burst  # noqa: E402
from reliability_helpers import LIVE_PROBE, Answer, closed_loop, encode, metric, real_photo, request_bytes  # noqa: E402

BLOCK = "reliability"
# The gates tests/reliability used to apply, kept here as the targets this report checks.
GOODPUT_TARGET = 0.8  # storm goodput >= 0.8 x capacity
DRAINS_TARGET = 2.0  # storm accepted p99 <= 2 queue drains
LIVE_P99_TARGET_MS = 100.0  # /health/live p99 under the /v2 flood
BURST_SLACK = 3.0  # bursts: p99 <= 3.0 x (queue / batch + 2) batch times (raised 2.0 -> 2.5 -> 3.0 in the test)


def log(msg: str) -> None:
    print(f"[bench-reliability {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class Server(Process):
    """`effnet serve` with the given EFFNET_* settings (nothing inherited from the caller's EFFNET_*)."""

    def __init__(self, work: Path, name: str, settings: dict[str, str], grpc_port: int = 0) -> None:
        env = {k: v for k, v in python_env().items() if not k.startswith("EFFNET_")}
        env.update({"EFFNET_THREADS": "1", "EFFNET_DECODE_WORKERS": "1", "EFFNET_GRPC_PORT": str(grpc_port), **settings})
        port = free_port()
        super().__init__(name, [sys.executable, "-m", "effnet_serve", "serve", "--host", "127.0.0.1", "--port", str(port)],
                         env, port, work / f"{name}.log")
        self.wait_ready(300)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def window(port: int, request: bytes, clients: int, warmup: float, seconds: float,
                 refused_pause_s: float = 0.0) -> dict:
    """A closed loop measured over [warmup, warmup + seconds): goodput and accepted latencies."""
    answers: list[Answer] = []
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    await closed_loop(port, request, clients, answers, lambda: time.perf_counter() >= t_end, refused_pause_s)
    inside = [a for a in answers if a.t0 >= t_start and a.t1 <= t_end]
    ok = [a.t1 - a.t0 for a in inside if a.status == 200]
    return {"clients": clients, "seconds": seconds, "ok": len(ok), "refused": sum(a.status in (429, 503) for a in inside),
            "errors": sum(a.status not in (200, 429, 503) for a in inside), "goodput": len(ok) / seconds,
            "p50_ms": ms(pct(ok, 50)), "p99_ms": ms(pct(ok, 99))}


# --- storm: test_rel_hostile_load.py's 16x overload ---------------------------------------------------
def storm(plan: dict, work: Path) -> dict:
    queue = 32
    photo = encode(real_photo((plan["crop"], plan["crop"])), "JPEG", quality=90)
    request = request_bytes(f"/classify?model={plan['model']}", photo)
    settings = {"EFFNET_REPOSITORY": str(plan["repo"]), "EFFNET_MODELS": plan["model"], "EFFNET_THREADS": "2",
                "EFFNET_DECODE_WORKERS": "2", "EFFNET_MAX_QUEUE": str(queue)}
    w = plan["window_s"]
    with Server(work, "storm", settings) as srv:
        # Capacity before and after the storm, averaged: a shared VM's speed drifts within minutes.
        before = asyncio.run(window(srv.port, request, 16, w["warmup"], w["capacity"]))
        during = asyncio.run(window(srv.port, request, 256, w["warmup"], w["storm"]))
        after = asyncio.run(window(srv.port, request, 16, w["warmup"] / 2, w["capacity"]))
    capacity = (before["goodput"] + after["goodput"]) / 2
    drain_ms = 1000 * queue / during["goodput"] if during["goodput"] else None
    return {"model": plan["model"], "queue": queue, "before": before, "storm": during, "after": after,
            "capacity_img_s": round(capacity, 1), "goodput_ratio": round(during["goodput"] / capacity, 3) if capacity else None,
            "drain_ms": round(drain_ms, 1) if drain_ms else None,
            "p99_in_drains": round(during["p99_ms"] / drain_ms, 2) if drain_ms and during["p99_ms"] else None}


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


def bursts(plan: dict, work: Path) -> dict:
    queue, batch = 8, 4
    request = request_bytes("/classify", encode(real_photo((160, 106)), "JPEG", quality=90))
    settings = {"EFFNET_REPOSITORY": str(plan["tiny_repo"]), "EFFNET_MODELS": "tiny", "EFFNET_DEFAULT_MODEL": "tiny",
                "EFFNET_MAX_QUEUE": str(queue), "EFFNET_MAX_BATCH": str(batch), "EFFNET_MAX_DELAY_MS": "5",
                "EFFNET_ADMISSION_WAIT_MS": "0"}

    async def at_capacity(port: int) -> float:
        answers: list[Answer] = []
        t0 = time.perf_counter()
        await closed_loop(port, request, queue, answers, lambda: len(answers) >= 6 * queue)
        return len(answers) / (time.perf_counter() - t0)

    with Server(work, "bursts", settings) as srv:
        rps_before = asyncio.run(at_capacity(srv.port))
        asyncio.run(_burst(srv.port, srv.base, request, 10 * queue, 64))  # warm-up
        measured = [asyncio.run(_burst(srv.port, srv.base, request, 10 * queue, 64)) for _ in range(plan["bursts"])]
        rps_after = asyncio.run(at_capacity(srv.port))
    latencies = [x for b in measured for x in b["latencies"]]
    n_batches = sum(b["batches"] for b in measured)
    batch_s = sum(b["span_s"] for b in measured) / n_batches
    mean_batch = sum(b["images"] for b in measured) / n_batches
    bound_s = (queue / mean_batch + 2) * batch_s
    p99 = pct(latencies, 99)
    return {"queue": queue, "max_batch": batch, "clients": 10 * queue, "bursts": len(measured), "accepted": len(latencies),
            "refused": sum(b["refused"] for b in measured), "p50_ms": ms(pct(latencies, 50)), "p99_ms": ms(p99),
            "batch_ms": ms(batch_s), "mean_batch": round(mean_batch, 2), "bound_ms": ms(bound_s),
            "ratio": round(p99 / bound_s, 2), "rps_before": round(rps_before), "rps_after": round(rps_after),
            "rps_during": round(len(latencies) / sum(b["span_s"] for b in measured))}


# --- floods: /health/live under the stalled uploads and under the hostile /v2 bodies -----------------------
def live_probes(url: str, count: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", LIVE_PROBE, url, str(count), "10"], capture_output=True, text=True,
                         timeout=count * 11 + 60, check=True, env=python_env()).stdout
    probes = json.loads(out)
    if any(status != 200 for status, _ in probes):
        raise RuntimeError(f"/health/live failed: {[p for p in probes if p[0] != 200][:5]}")
    return [s for _, s in probes]


def latency_row(seconds: list[float]) -> dict:
    return {"n": len(seconds), "p50_ms": ms(pct(seconds, 50)), "p99_ms": ms(pct(seconds, 99)), "max_ms": ms(max(seconds))}


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


def floods(plan: dict, work: Path) -> dict:
    n = plan["probes"]
    result: dict = {}
    # 300 uploads that send their headers and 100 bytes, then nothing (test_rel_hostile.py). Here they are
    # held for the whole window (no upload-rate floor, a long body timeout) so every probe meets all of them.
    photo = encode(real_photo(), "JPEG", quality=90)
    settings = {"EFFNET_REPOSITORY": str(plan["tiny_repo"]), "EFFNET_MODELS": "tiny", "EFFNET_DEFAULT_MODEL": "tiny",
                "EFFNET_MAX_QUEUE": "32", "EFFNET_MIN_UPLOAD_KBPS": "0", "EFFNET_BODY_TIMEOUT_S": "300"}
    with Server(work, "stalled", settings) as srv:
        quiet = {"live": latency_row(live_probes(srv.base, n)), "request": latency_row(normal_requests(srv.base, photo, 10))}
        head = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 200000\r\n\r\n"
                + b"\xff" * 100)
        stalled = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
                s.sendall(head)
                stalled.append(s)
            time.sleep(0.5)  # let them reach the server
            held = {"live": latency_row(live_probes(srv.base, n)), "request": latency_row(normal_requests(srv.base, photo, 10))}
        finally:
            for s in stalled:
                s.close()
    result["stalled"] = {"connections": 300, "quiet": quiet, "held": held}

    settings = {"EFFNET_REPOSITORY": str(plan["repo"]), "EFFNET_MODELS": plan["model"], "EFFNET_THREADS": "2",
                "EFFNET_DECODE_WORKERS": "2", "EFFNET_MAX_QUEUE": "32", "EFFNET_MAX_BODY_MB": "20"}
    with Server(work, "v2flood", settings) as srv:
        quiet = latency_row(live_probes(srv.base, n))
        flood = subprocess.Popen([sys.executable, str(RELIABILITY / "v2_flood.py"), srv.base], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=python_env())
        try:
            if flood.stdout.readline().strip() != "flooding":
                raise RuntimeError("the /v2 flood got no answer")
            during = latency_row(live_probes(srv.base, n))
            counts = json.loads(flood.communicate(input="", timeout=300)[0])
        finally:
            if flood.poll() is None:
                flood.kill()
    result["v2_flood"] = {"quiet": quiet, "flood": during, "hostile_requests": sum(sum(v.values()) for v in counts.values()),
                          "by_body": counts}
    return result


# --- memory: test_rel_hostile_load.py's burst --------------------------------------------------------
def memory(plan: dict, work: Path) -> dict:
    budget_mb = memory_burst.BUDGET_MB
    settings = {"EFFNET_REPOSITORY": str(plan["repo"]), "EFFNET_MODELS": plan["model"], "EFFNET_THREADS": "2",
                "EFFNET_DECODE_WORKERS": "2", **memory_burst.server_settings()}

    def clients(url: str, *what: str) -> dict:
        out = subprocess.run([sys.executable, str(RELIABILITY / "memory_burst.py"), url, *what], capture_output=True,
                             text=True, timeout=900, check=True, env=python_env()).stdout
        return json.loads(out)

    with Server(work, "memory", settings) as srv:
        start = memory_kib(srv.pid)
        warm = clients(srv.base, "warm")
        footprint = memory_kib(srv.pid)
        burst = clients(srv.base, "burst", "600", str(plan["memory_requests"]))
        peak = memory_kib(srv.pid)
        time.sleep(2.0)
        settled = memory_kib(srv.pid)
    mib = lambda kib: round(kib / 1024)  # noqa: E731
    attempts = {k: sum(v["attempts"].values()) for k, v in burst["kinds"].items()}
    # What the test allows over the footprint: the budget, the queue's preprocessed images, glibc's retention.
    allowed_mb = budget_mb + memory_burst.QUEUE * 3 * plan["crop"] ** 2 * 4 / 2**20 + 128
    return {"model": plan["model"], "budget_mb": budget_mb, "allowed_mb": round(allowed_mb), "warm": warm,
            "loaded_mb": mib(start["VmRSS"]),
            "footprint_mb": mib(footprint["VmHWM"]), "peak_mb": mib(peak["VmHWM"]), "after_mb": mib(settled["VmRSS"]),
            "over_footprint_mb": mib(peak["VmHWM"] - footprint["VmHWM"]), "seconds": burst["seconds"],
            "requests": {k: sum(v["final"].values()) for k, v in burst["kinds"].items()}, "attempts": attempts,
            "final": {k: v["final"] for k, v in burst["kinds"].items()}, "bad_refusals": len(burst["bad_refusals"])}


# --- the report ---------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def markdown(d: dict) -> str:
    m, s, b, f, mem = d["machine"], d["storm"], d["bursts"], d["floods"], d["memory"]
    L = [f"<!-- {BLOCK} -->", "## Reliability scenarios: speeds (`make bench-reliability`)", ""]
    if d["quick"]:
        L += ["> **Quick (smoke) run**: tiny model, short windows. It checks that the benchmark works; its numbers mean nothing.", ""]
    L.append(f"Written by `{d['command']}` on {d['date']} ({d['run_s']:.0f} s); {m.get('cpu')}, {m.get('cores')} cores"
             + (f", ISA: {m['isa']}" if m.get("isa") else "") + f"; other processes used {d['others_cpu_pct']:.0f}% of one core meanwhile. "
             "The scenarios and clients of `tests/reliability/` (each on its own `effnet serve`), timed: the tests assert "
             "what holds at any speed (refusals, bounds, nothing lost, every probe answered); these figures, which "
             "depend on the machine and on what else runs on it, are reported here, against the targets the tests "
             "used to gate on.")
    L += ["", "| scenario | measured | target | |", "| --- | --- | --- | --- |"]
    L.append(f"| 16x overload ({s['model']}, queue {s['queue']}, 256 clients resending at once): goodput / capacity | "
             f"{s['storm']['goodput']:.1f} / {s['capacity_img_s']} img/s = **{s['goodput_ratio']:.2f}** | ≥ {GOODPUT_TARGET} | "
             f"{verdict(s['goodput_ratio'] >= GOODPUT_TARGET if s['goodput_ratio'] else None)} |")
    L.append(f"| same: accepted p99 in queue drains (drain = queue / goodput = {s['drain_ms']} ms) | "
             f"{s['storm']['p99_ms']} ms = **{s['p99_in_drains']}** drains | ≤ {DRAINS_TARGET} | "
             f"{verdict(s['p99_in_drains'] <= DRAINS_TARGET if s['p99_in_drains'] else None)} |")
    L.append(f"| bursts (tiny, queue {b['queue']}, batch {b['max_batch']}, {b['clients']} clients, no admission wait): "
             f"p99 / ((queue / batch + 2) × batch time) | {b['p99_ms']} / {b['bound_ms']} ms = **{b['ratio']}** "
             f"(batch {b['batch_ms']} ms at a mean of {b['mean_batch']}) | ≤ {BURST_SLACK} | {verdict(b['ratio'] <= BURST_SLACK)} |")
    v = f["v2_flood"]
    L.append(f"| `/health/live` under the hostile /v2 flood ({v['hostile_requests']} bodies) | p50 {v['flood']['p50_ms']} / "
             f"p99 **{v['flood']['p99_ms']}** / max {v['flood']['max_ms']} ms (quiet: p99 {v['quiet']['p99_ms']}) | "
             f"p99 < {LIVE_P99_TARGET_MS:.0f} ms | {verdict(v['flood']['p99_ms'] < LIVE_P99_TARGET_MS)} |")
    st = f["stalled"]
    L.append(f"| `/health/live` with {st['connections']} uploads stalled after their headers (tiny) | p50 {st['held']['live']['p50_ms']} / "
             f"p99 **{st['held']['live']['p99_ms']}** / max {st['held']['live']['max_ms']} ms (quiet: p99 {st['quiet']['live']['p99_ms']}) | — | |")
    L.append(f"| a normal request meanwhile (a 451×300 JPEG, tiny) | p50 {st['held']['request']['p50_ms']} / max "
             f"{st['held']['request']['max_ms']} ms (quiet: p50 {st['quiet']['request']['p50_ms']}) | — | |")
    L.append(f"| memory burst ({mem['model']}, budget {mem['budget_mb']} MB; {sum(mem['requests'].values())} requests, "
             f"{sum(mem['attempts'].values())} sends with the retries): peak RSS over the footprint | "
             f"{mem['peak_mb']} − {mem['footprint_mb']} = **{mem['over_footprint_mb']} MB** ({mem['over_footprint_mb'] / mem['budget_mb']:.0%} "
             f"of the budget); {mem['after_mb']} MB after | ≤ {mem['allowed_mb']} MB: budget + queued images + "
             f"128 MB malloc retention (the test's bound) | {verdict(mem['over_footprint_mb'] <= mem['allowed_mb'])} |")
    L.append("")
    L.append(f"- **Storm windows**: capacity {s['before']['goodput']:.1f} img/s before and {s['after']['goodput']:.1f} after "
             f"(16 clients, p99 {s['before']['p99_ms']} / {s['after']['p99_ms']} ms); the storm {s['storm']['ok']} answers 200 and "
             f"{s['storm']['refused']} refusals in {s['storm']['seconds']:g} s.")
    L.append(f"- **Bursts**: {b['bursts']} of 64 accepted (after one warm-up), {b['accepted']} accepted, {b['refused']} refused; "
             f"p50 {b['p50_ms']} ms. Throughput at the admitted concurrency: {b['rps_before']}/s before, {b['rps_during']}/s "
             f"during (the server spends most of its time refusing a retry flood), {b['rps_after']}/s after.")
    L.append(f"- **Memory burst**: {mem['seconds']:g} s; final answers {mem['final']}; sends per kind with the retries "
             f"{mem['attempts']}; RSS {mem['loaded_mb']} MB loaded, {mem['footprint_mb']} MB peak after full-batch warm-up.")
    L.append(f"<!-- /{BLOCK} -->")
    return "\n".join(L)


def make_plan(args: argparse.Namespace) -> dict:
    quick = args.quick
    repo = (args.repo or QUICK_CACHE) if quick else (args.repo or DEFAULT_REPO)
    return {
        "quick": quick, "repo": repo, "tiny_repo": QUICK_CACHE, "model": "tiny" if quick else "b0",
        "crop": 64 if quick else 224,
        "window_s": {"warmup": 0.5, "capacity": 1.5, "storm": 2.0} if quick else {"warmup": 2.0, "capacity": 6.0, "storm": 10.0},
        "bursts": 2 if quick else 5, "probes": 20 if quick else 200, "memory_requests": 1 if quick else 3,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny model, short windows, output to a temp dir")
    p.add_argument("--out", type=Path, help="where benchmarks-reliability.json and benchmarks.md are (default docs/)")
    p.add_argument("--repo", type=Path, help=f"repository holding b0 (default {DEFAULT_REPO.relative_to(ROOT)})")
    args = p.parse_args(argv)
    if args.quick:
        out = args.out or Path(tempfile.mkdtemp(prefix="effnet-bench-reliability-quick-"))
        if out.resolve() == DOCS.resolve():
            raise SystemExit("--quick never writes to docs/: its numbers are meaningless")
    else:
        out = args.out or DOCS
    plan = make_plan(args)

    from benchmarks.blocks import machine_info, write_owned_block

    build_models(QUICK_CACHE, ["tiny"], allow_build=True)
    if not args.quick:
        build_models(plan["repo"], ["b0"], allow_build=True)
    t0, busy0, own0 = time.perf_counter(), cpu_busy_s(), own_cpu_s()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        for name, fn in (("storm", storm), ("bursts", bursts), ("floods", floods), ("memory", memory)):
            log(f"{name} ...")
            t = time.perf_counter()
            results[name] = fn(plan, Path(tmp))
            log(f"{name} took {time.perf_counter() - t:.0f} s")
    run_s = time.perf_counter() - t0
    data = {"command": " ".join(["python -m benchmarks.reliability", *argv]).strip(), "quick": args.quick,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_info(), "run_s": round(run_s, 1),
            "others_cpu_pct": max(0.0, 100.0 * ((cpu_busy_s() - busy0) - (own_cpu_s() - own0)) / run_s),
            "loadavg_end": os.getloadavg(), **results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks-reliability.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    write_owned_block(out / "benchmarks.md", BLOCK, markdown(data))
    log(f"took {run_s:.0f} s; wrote {out / 'benchmarks-reliability.json'} and the {BLOCK} block of {out / 'benchmarks.md'}")
    print(f"command: {data['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
