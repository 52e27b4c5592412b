"""Hostile load that costs the server real work, against a real `effnet serve` with B0 (random weights).

What a correct server does whatever the machine's speed. How fast it does it (goodput under the storm
against the capacity measured in the same run, accepted p99 against queue drains, /health/live latency
under floods, the memory peak against the footprint) is measured by `make bench-reliability`
(benchmarks/reliability.py, the same scenarios) and reported in docs/benchmarks.md.

* 16x overload with immediate retries: 256 closed-loop clients resend the moment they are refused, against
  a queue of 32, until 1000 requests were answered 200. Every answer is a 200 or a 503/429 with
  Retry-After and the JSON error; no request is lost (every one sent is answered); the queue /metrics
  shows never holds more than 32; each refused client was held the admission wait (1-2 s) before its 503,
  which bounds what the storm costs to about one refusal per client per second; right after the storm,
  16 clients (under the bound) are never refused. The client is raw asyncio sockets with prebuilt bytes:
  it must cost far less per request than the server, since both share the same two cores.
* A memory burst (18 MB bodies, 16-bit PNG bombs, 64-part multiparts, all valid images, together far
  over the budget) from clients that honour Retry-After: every request of every kind ends with a 200,
  every refusal on the way is a 503 with Retry-After, and the server's peak RSS stays within what its
  configuration bounds: the models' footprint, the budget, the queue's preprocessed images and what glibc
  keeps of freed memory.
* A flood of hostile /v2 bodies (a gzip bomb of zero-length BYTES elements, oversized element counts, a
  big JSON FP32 tensor): every /health/live probe sent while it runs is answered 200 within the liveness
  probe's timeout of the Kubernetes deployment (deploy/k8s/base/deployment.yaml).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import memory_burst
import pytest
from reliability_helpers import (
    LIVE_PROBE,
    ROOT,
    Answer,
    check_error,
    closed_loop,
    encode,
    metric,
    real_photo,
    record,
    request_bytes,
    server_process,
)

PHOTO = encode(real_photo((224, 224)), "JPEG", quality=90)
REQUEST = request_bytes("/classify?model=b0", PHOTO)
QUEUE = 32
OVERLOAD_CLIENTS = 256
STORM_ACCEPTED = 1000  # the storm lasts until this many 200s: the same work on a fast or a slow machine
STORM_DEADLINE_S = 300  # 10-20 s on this 2-core machine; only a server that stops answering gets near it
# Every refusal of the storm comes after the admission wait, which is at least 1 s (DataPlane.admission_wait_s:
# the queue's drain time, clamped to 1..2 s). The server times it from uvloop's clock, which is read once per
# loop iteration and so lags by up to one iteration (a refusal was seen 0.1 ms short of 1 s under load): half
# the wait is the bound here, still hundreds of times what a server that refuses at once takes (about 2 ms).
SHORTEST_REFUSAL_S = 0.5


def b0_env(b0_repo: Path, **extra: str) -> dict[str, str]:
    return {"EFFNET_REPOSITORY": str(b0_repo), "EFFNET_MODELS": "b0", "EFFNET_THREADS": "2",
            "EFFNET_DECODE_WORKERS": "2", "EFFNET_MAX_QUEUE": str(QUEUE), **extra}


async def _storm(url: str, port: int) -> tuple[list[Answer], list[float]]:
    """The retry storm, with /metrics' queue depth sampled while it runs."""
    answers: list[Answer] = []
    deadline = time.monotonic() + STORM_DEADLINE_S
    counted = {"seen": 0, "ok": 0}  # answers looked at so far, and the 200s among them

    def finished() -> bool:
        for a in answers[counted["seen"]:]:
            counted["ok"] += a.status == 200
        counted["seen"] = len(answers)
        return counted["ok"] >= STORM_ACCEPTED or time.monotonic() > deadline

    depths: list[float] = []

    async def sample_depth() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while not finished():
                depths.append(metric((await c.get("/metrics")).text, "effnet_queue_depth", model="b0"))
                await asyncio.sleep(0.05)

    await asyncio.gather(closed_loop(port, REQUEST, OVERLOAD_CLIENTS, answers, finished), sample_depth())
    return answers, depths


def test_16x_overload_with_immediate_retries_answers_every_request_within_the_queue_bound(b0_repo, tmp_path):
    with server_process(b0_env(b0_repo), tmp_path / "server.log") as srv:
        answers, depths = asyncio.run(_storm(srv.url, srv.port))
        # Right after the storm: half the queue's worth of clients, one request each at a time, is never refused.
        after: list[Answer] = []
        asyncio.run(closed_loop(srv.port, REQUEST, QUEUE // 2, after, lambda: len(after) >= 4 * QUEUE))
        text = httpx.get(srv.url + "/metrics").text
        assert srv.alive()
    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status in (429, 503)]
    other = [f"{a.status} {a.error} {a.body[:200]!r}" for a in answers if a.status not in (200, 429, 503)]
    record("hostile", overload={
        "queue": QUEUE, "storm_clients": OVERLOAD_CLIENTS, "storm_accepted": len(ok), "storm_refusals": len(refused),
        "storm_other": len(other), "max_queue_depth_seen": max(depths, default=None), "depth_samples": len(depths),
        "shortest_refusal_s": round(min((a.t1 - a.t0 for a in refused), default=0), 3),
        "after_requests": len(after), "after_ok": sum(a.status == 200 for a in after),
        "refused_total": metric(text, "effnet_requests_rejected_total", model="b0", reason="queue_full"),
    })
    assert not other, other[:3]  # nothing lost: every request sent got a 200 or a refusal
    assert len(ok) >= STORM_ACCEPTED, f"{len(ok)} answered 200 in {STORM_DEADLINE_S} s"
    assert refused, "256 clients against a queue of 32 were never refused"
    for a in refused:
        assert int(a.headers["retry-after"]) >= 1, a.headers
        assert check_error(a.status, a.headers, a.body)["code"] == "overloaded"
    # Held the admission wait before the "no": a lower bound on a duration (see SHORTEST_REFUSAL_S).
    assert min(a.t1 - a.t0 for a in refused) >= SHORTEST_REFUSAL_S, min(a.t1 - a.t0 for a in refused)
    assert depths and max(depths) <= QUEUE, (len(depths), max(depths, default=None))
    assert [a.status for a in after] == [200] * len(after), [a.status for a in after if a.status != 200][:5]


# --- memory ------------------------------------------------------------------------------------
# A polite client gives up on a request after this. The burst takes 35-50 s on this 2-core machine, up to
# 110 s when other work shares it; only a server that keeps refusing gets near the deadline.
BURST_DEADLINE_S = 420
# Freed memory glibc may keep resident before handing it back: the trim threshold (64 MB) in each of the
# two malloc arenas app/core/malloc.py:tune_malloc allows.
MALLOC_RETAINED = 2 * (64 << 20)


def _vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _clients(url: str, *what: str) -> dict:
    """tests/reliability/memory_burst.py in a process of its own; its JSON summary."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("memory_burst.py")), url, *what],
                         capture_output=True, text=True, timeout=BURST_DEADLINE_S + 240, check=True).stdout
    return json.loads(out)


@pytest.mark.timeout(BURST_DEADLINE_S + 300)  # pyproject's 600 s would cut the deadline short
def test_a_hostile_memory_burst_is_answered_in_full_within_the_budget(b0_repo, tmp_path):
    env = b0_env(b0_repo, **memory_burst.server_settings())
    with server_process(env, tmp_path / "server.log") as srv:
        # The models' footprint includes their working memory at full batch (ORT's arena grows to the
        # largest batch it has run and keeps it: +250 MB for b0 here), so warm them with full batches first.
        assert _clients(srv.url, "warm") == {"200": 3}
        footprint = _vm(srv.pid, "VmHWM")  # models loaded and run at full batch: their peak so far
        burst = _clients(srv.url, "burst", str(BURST_DEADLINE_S))
        peak = _vm(srv.pid, "VmHWM")
        alive = srv.alive()
    kinds = burst["kinds"]
    budget = memory_burst.BUDGET_MB << 20
    # Preprocessed images waiting in the queue are not bytes in flight: the queue bound holds them instead.
    queued = memory_burst.QUEUE * 3 * 224 * 224 * 4
    record("hostile", memory={"budget_mb": budget >> 20, "queue_tensors_mb": queued >> 20, "footprint_mb": footprint >> 20,
                              "peak_rss_mb": peak >> 20, "seconds": burst["seconds"],
                              "final": {k: v["final"] for k, v in kinds.items()},
                              "attempts": {k: v["attempts"] for k, v in kinds.items()}})
    assert alive
    assert not burst["bad_refusals"], burst["bad_refusals"][:3]
    for kind, v in kinds.items():
        # Every request of every kind answered 200 in the end; on the way, refusals only (503 + Retry-After).
        assert v["final"] == {"200": sum(v["final"].values())}, (kind, v)
        assert set(v["attempts"]) <= {"200", "503"}, (kind, v)
    # What the configuration promises, whatever the requests' timing: at most the budget of bodies and pixels
    # in flight (EFFNET_MAX_INFLIGHT_MB), at most the queue's worth of preprocessed images, and what glibc
    # keeps of freed blocks. Measured here: 210-320 MB over the footprint; with no budget at all, 650 MB.
    assert peak <= footprint + budget + queued + MALLOC_RETAINED, (peak >> 20, footprint >> 20)


# --- /v2 bodies that are expensive to parse -----------------------------------------------------------
PROBES = 40


def liveness_timeout_s() -> float:
    """timeoutSeconds of the liveness probe the Kubernetes deployment gives the server."""
    text = (ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text()
    probe = re.search(r"livenessProbe:(.*?)(?:\n\s*\w+Probe:|\Z)", text, re.S)
    assert probe, "no livenessProbe in deploy/k8s/base/deployment.yaml"
    return float(re.search(r"timeoutSeconds:\s*(\d+)", probe.group(1)).group(1))


def test_a_flood_of_hostile_v2_bodies_leaves_the_liveness_probe_answering(b0_repo, tmp_path):
    # The flood (tests/reliability/v2_flood.py) and the probe are processes of their own, so the probe
    # meets the server, not pytest's GIL or heap as earlier tests left them. The flood runs from before the
    # first probe until after the last: it is stopped only once the probes are done.
    timeout = liveness_timeout_s()
    env = b0_env(b0_repo, EFFNET_MAX_BODY_MB="20")
    with server_process(env, tmp_path / "server.log") as srv:
        flood = subprocess.Popen([sys.executable, str(Path(__file__).with_name("v2_flood.py")), srv.url],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout.readline().strip() == "flooding"  # its first answers are in
            probes = json.loads(subprocess.run([sys.executable, "-c", LIVE_PROBE, srv.url, str(PROBES), str(timeout)],
                                               capture_output=True, text=True, timeout=PROBES * (timeout + 1) + 60,
                                               check=True).stdout)
            counts = json.loads(flood.communicate(input="", timeout=180)[0])
        finally:
            if flood.poll() is None:
                flood.kill()
        assert srv.alive()
    statuses = {str(s): sum(1 for p in probes if p[0] == s) for s in sorted({p[0] for p in probes})}
    record("hostile", v2_flood={"hostile_requests": sum(sum(v.values()) for v in counts.values()), "by_body": counts,
                                "live_probes": len(probes), "live_statuses": statuses, "live_timeout_s": timeout})
    for body, answers in counts.items():
        assert answers and set(answers) <= {"200", "400", "413"}, (body, answers)
    # Answered at all, within what the deployment allows a liveness probe: how fast is the benchmark's question.
    assert statuses == {"200": PROBES}, probes
