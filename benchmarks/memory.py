"""`make bench-memory` and `make bench-soak`: the memory of every process of the service, b0..b7 loaded.

    python -m benchmarks.memory             # b0..b7 at default settings: PSS at ready, through bursts, after
    python -m benchmarks.memory --soak      # RSS over a 10-minute burst (issue 5: within 10% of after warm-up)
    python -m benchmarks.memory [--soak] --quick --out DIR   # smoke: the tiny models, short bursts, never docs/

Default: for the default worker count and for one process, `effnet serve` on a repository of b0..b7 and nothing
else (no batch table: the defaults), measured at ready, then through a burst of 32 concurrent photo requests on
each model in turn (b0 first), sampled every 0.2 s, and 5 s after the burst. Memory is PSS from
/proc/PID/smaps_rollup, summed over the service's process group (shared pages counted once), with RSS beside it.

--soak: `effnet serve` with b0..b7 loaded; every burst model warmed up with a short burst, then RSS summed over its
processes (the reference); then `--minutes` of load in 30-second segments rotating over the burst models (1920×1080
JPEG photos, `--clients` keep-alive clients from the load-generator process), RSS sampled after each segment.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.blocks import block_main, cores, start_service
from benchmarks.harness import (ALL_B, DEFAULT_REPO, QUICK_CACHE, QUICK_MODELS, build_models, group_pids, loadgen, log,
                                memory_kib, write_photo)
from benchmarks.records import Answers, Footprint, Record, Soak, SoakSample

BURST = 32
SEGMENT_S, WARMUP_S = 30.0, 8.0


def rollup(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}


def snapshot(pgid: int) -> dict[str, dict[str, int]]:
    """process kind -> PSS and RSS (bytes): the root, the engine (the biggest child), the rest."""
    rows = {pid: r for pid in group_pids(pgid) if (r := rollup(pid))}
    children = sorted((pid for pid in rows if pid != pgid), key=lambda p: -rows[p].get("Rss", 0))
    kinds = {pgid: "supervisor" if children else "the one process"}
    if children:
        kinds[children[0]] = "engine"
        kinds.update({pid: "workers and helpers" for pid in children[1:]})
    by: dict[str, dict[str, int]] = {}
    for pid, r in rows.items():
        k = by.setdefault(kinds[pid], {"pss": 0, "rss": 0})
        k["pss"] += r.get("Pss", 0)
        k["rss"] += r.get("Rss", 0)
    return by


def burst(url: str, photo: bytes, model: str, n: int) -> dict[str, int]:
    import httpx

    def one(_: int) -> int:
        try:
            return httpx.post(f"{url}/classify?model={model}", content=photo, headers={"content-type": "image/jpeg"},
                              timeout=120).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(one, range(n)))
    return {str(c): codes.count(c) for c in sorted(set(codes))}


def measure(plan: argparse.Namespace, repo: Path, models: list[str], workers: int, photo: bytes) -> list[Record]:
    proc = start_service(plan.work, repo, ",".join(models), workers, {"EFFNET_GRPC_PORT": "0"}, ready_s=900).proc
    pss = lambda s: sum(k["pss"] for k in s.values())  # noqa: E731
    try:
        time.sleep(2.0)
        ready = snapshot(proc.pid)
        peak, stop = ready, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.2):
                if pss(s := snapshot(proc.pid)) > pss(peak):
                    peak = s

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out: list[Record] = []
        for model in models:
            out.append(Answers(workers, model, burst(proc.base, photo, model, plan.settings["burst"])))
            log(f"{workers} workers: {model} {out[-1].codes}, PSS now {pss(snapshot(proc.pid)) / (1 << 30):.2f} GiB")
        stop.set()
        sampler.join()
        time.sleep(5.0)
        after = snapshot(proc.pid)
    finally:
        proc.stop()
    return [Footprint(workers, when, kind, v["pss"], v["rss"]) for when, s in (("ready", ready), ("peak", peak), ("after", after))
            for kind, v in s.items()] + out


def soak(plan: argparse.Namespace, repo: Path, loaded: list[str]) -> list[Record]:
    burst_models = plan.models.split(",") if plan.models else (loaded if plan.quick else ["b0", "b2", "b4", "b7"])
    segment, body = plan.window if plan.quick else SEGMENT_S, write_photo(plan.work / "photo.jpg")
    server = start_service(plan.work, repo, ",".join(loaded), cores(), {"EFFNET_GRPC_PORT": "0"}, ready_s=600).proc
    try:
        for m in burst_models:  # every batch shape and every code path touched once before the reference
            loadgen(f"{server.base}/classify?model={m}", body, plan.clients, plan.window if plan.quick else WARMUP_S, 1.0, 60)
        warm = memory_kib(server.pid)["VmRSS"]
        log(f"after warm-up: {warm / 2**20:.2f} GiB; bursting for {plan.minutes:g} minutes")
        samples, requests, errors, t0 = [], 0, 0, time.monotonic()
        while time.monotonic() - t0 < plan.minutes * 60:
            model = burst_models[len(samples) % len(burst_models)]
            r = loadgen(f"{server.base}/classify?model={model}", body, plan.clients, segment, 0.0, 120)
            requests, errors = requests + r["ok"], errors + r["errors"]
            samples.append(SoakSample(round(time.monotonic() - t0, 1), model, memory_kib(server.pid)["VmRSS"]))
            log(f"{samples[-1].t_s:>6.0f} s  {model}: RSS {samples[-1].rss_kib / 2**20:.2f} GiB")
        end = memory_kib(server.pid)
    finally:
        server.stop()
    plan.settings = {"segment_s": segment}
    return [Soak(loaded, burst_models, plan.minutes, plan.clients, requests, errors, warm, end["VmRSS"], end["VmHWM"]), *samples]


def run(plan: argparse.Namespace) -> list[Record]:
    from PIL import Image
    from skimage import data as skdata

    models, source = (list(QUICK_MODELS), QUICK_CACHE) if plan.quick else (ALL_B, DEFAULT_REPO)
    build_models(source, models, True)
    repo = plan.work / "repo"  # these models alone, as a user's repository with no batch table would be
    repo.mkdir()
    for m in models:
        (repo / m).symlink_to(source / m)
    if plan.soak:
        plan.bench = "soak"
        plan.minutes = plan.minutes if plan.minutes is not None else (0.1 if plan.quick else 10.0)
        return soak(plan, repo, models)
    plan.settings = {"burst": 4 if plan.quick else BURST}
    Image.fromarray(skdata.astronaut()).resize((1000, 750)).save(path := plan.work / "photo.jpg", quality=90)
    return [r for w in dict.fromkeys([cores(), 1]) for r in measure(plan, repo, models, w, path.read_bytes())]


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--soak", action="store_true", help="RSS over a long burst instead (make bench-soak)")
    p.add_argument("--minutes", type=float, default=None, help="--soak: how long (default 10)")
    p.add_argument("--models", default="", help="--soak: the models the burst rotates over (default b0,b2,b4,b7)")
    p.add_argument("--clients", type=int, default=16, help="--soak: load-generator clients (default 16)")


def main() -> int:
    return block_main("memory", run, options=options)


if __name__ == "__main__":
    sys.exit(main())
