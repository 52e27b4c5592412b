"""Overload: ten times more clients than the service admits, in repeated bursts, against a
real `effnet serve` process running a real EfficientNet (the `tiny` fixture model).

What must hold whatever the machine's speed:
* excess requests are refused at once with 503 + Retry-After - shown without a clock: a
  probe that sends only its headers (its body never comes) is answered 503 while the burst
  runs, so the refusal waits neither for the body nor for the queue;
* a refusal only when the queue is full: every 503 overlaps at least MAX_QUEUE accepted
  requests (each holds its queue slot from admission to answer, inside the time its client
  waited), so the service admits up to its bound - and /metrics never shows more queued;
* nothing is lost: every request is answered 200 or 503, never dropped or anything else;
* the server's RSS (/proc/PID/status) stays flat across bursts after a warm-up burst;
* when the burst ends, the admitted concurrency is answered 200 every time.

How fast (accepted p99 against (queue / batch + 2) batch times, throughput before, during and
after the bursts) is measured by `make bench-reliability` (benchmarks/reliability.py) on the same
scenario and reported in docs/benchmarks.md: a shared machine's speed is not a test verdict.

The per-request deadline (EFFNET_REQUEST_TIMEOUT_S) is covered by
tests/serving/test_serve_api.py::test_requests_waiting_past_the_deadline_get_503.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from reliability_helpers import (
    Answer,
    ServerProcess,
    check_error,
    closed_loop,
    encode,
    metric,
    real_photo,
    record,
    request_bytes,
    rss_kb,
)

MAX_QUEUE = 8  # the admitted concurrency ("capacity")
MAX_BATCH = 4
CLIENTS = 10 * MAX_QUEUE
# Each burst lasts until this many requests were accepted; meanwhile every client sends
# back to back and, when refused, retries after REFUSED_PAUSE_S. That is far sooner than the
# Retry-After it was given (a polite client would wait seconds), so the server stays at ten
# times its capacity for the whole burst.
ACCEPTED_PER_BURST = 64
REFUSED_PAUSE_S = 0.02
BURST_DEADLINE_S = 120  # a burst takes about a second here; only a server that stops admitting gets near it
BURSTS = 5  # measured, after one warm-up burst
RSS_GROWTH = 0.15
PROBES_PER_BURST = 20

IMAGE = encode(real_photo((160, 106)), "JPEG", quality=90)


@pytest.fixture(scope="module")
def srv(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {
        "EFFNET_REPOSITORY": str(tiny_repo), "EFFNET_MODELS": "tiny", "EFFNET_DEFAULT_MODEL": "tiny",
        "EFFNET_MAX_QUEUE": str(MAX_QUEUE), "EFFNET_MAX_BATCH": str(MAX_BATCH), "EFFNET_MAX_DELAY_MS": "5",
        # Refuse the moment the queue is full (no admission wait), so "at once" is what is shown here; the
        # default, waiting up to one drain, is exercised in test_rel_hostile_load.py.
        "EFFNET_ADMISSION_WAIT_MS": "0",
    }
    server = ServerProcess(env, tmp_path_factory.mktemp("overload") / "server.log").start()
    yield server
    server.stop()


async def _header_only_probe(port: int) -> str:
    """Headers announcing a body that never comes. "refused" if answered 503 + Retry-After without it;
    anything else is returned as it came. An admitted probe is (rightly) waited on for its body and is
    cancelled when the burst ends: no clock decides which of the two it was."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        refused = head.startswith(b"HTTP/1.1 503") and b"retry-after" in head.lower()
        return "refused" if refused else head.split(b"\r\n", 1)[0].decode("latin-1")
    finally:
        writer.close()


REQUEST = request_bytes("/classify", IMAGE)


async def _burst(url: str, port: int) -> dict:
    answers: list[Answer] = []
    deadline = time.monotonic() + BURST_DEADLINE_S
    counted = {"seen": 0, "accepted": 0}
    overloaded = asyncio.Event()
    depths: list[float] = []

    def done() -> bool:
        for a in answers[counted["seen"]:]:
            counted["accepted"] += a.status == 200
            if a.status == 503:
                overloaded.set()
        counted["seen"] = len(answers)
        return counted["accepted"] >= ACCEPTED_PER_BURST or time.monotonic() > deadline

    async def prober() -> list[str]:
        """Header-only probes, one every 10 ms once the burst has filled the queue, until 3 were refused."""
        await overloaded.wait()
        probes: list[asyncio.Task] = []

        def refused() -> int:
            return sum(p.done() and not p.exception() and p.result() == "refused" for p in probes)

        while not done() and len(probes) < PROBES_PER_BURST and refused() < 3:
            probes.append(asyncio.create_task(_header_only_probe(port)))
            await asyncio.sleep(0.01)
        while not done() and not all(p.done() for p in probes):
            await asyncio.sleep(0.01)
        for p in probes:
            p.cancel()
        return [r for r in await asyncio.gather(*probes, return_exceptions=True) if isinstance(r, str)]

    async def sample_depth() -> None:
        while not done():
            depths.append(metric((await c.get("/metrics")).text, "effnet_queue_depth", model="tiny"))
            await asyncio.sleep(0.02)

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        before = (await c.get("/metrics")).text
        probe_task = asyncio.create_task(prober())
        await asyncio.gather(closed_loop(port, REQUEST, CLIENTS, answers, done, REFUSED_PAUSE_S), sample_depth())
        overloaded.set()  # (a burst never refused has no prober to wait for)
        probes = await probe_task
        after = (await c.get("/metrics")).text

    def delta(name: str) -> int:
        return int(metric(after, name, model="tiny") - metric(before, name, model="tiny"))

    accepted = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 503]
    return {
        "accepted": len(accepted), "refused": len(refused), "refused_answers": refused, "accepted_answers": accepted,
        "other": [f"{a.status} {a.error} {a.body[:200]!r}" for a in answers if a.status not in (200, 503)],
        "batches": delta("effnet_batch_size_count"), "images": delta("effnet_batch_size_sum"),
        "probes_sent": len(probes), "refused_without_body": probes.count("refused"),
        "probes_other": [p for p in probes if p != "refused"], "max_depth": max(depths, default=None),
        "depth_samples": len(depths),
        # Fewest accepted requests in flight during any refusal (see _fewest_admitted_during_a_refusal).
        "fewest_admitted_at_refusal": _fewest_admitted_during_a_refusal(accepted, refused),
    }


def _fewest_admitted_during_a_refusal(accepted: list[Answer], refused: list[Answer]) -> int | None:
    """Over every refusal, the fewest accepted requests whose client-side span overlaps it. The server refuses
    (with no admission wait) only when MAX_QUEUE images are admitted and unanswered; each of those requests
    was sent before and answered after that moment, which lies inside the refusal's own span. So a server
    that refuses only when full gives >= MAX_QUEUE here, at any speed; one that refuses early gives less."""
    fewest = None
    for r in refused:
        n = sum(1 for a in accepted if a.t0 < r.t1 and a.t1 > r.t0)
        fewest = n if fewest is None else min(fewest, n)
    return fewest


async def _at_capacity(port: int, per_client: int = 6) -> list[int]:
    """MAX_QUEUE clients, back to back: the most the service admits, so all must be 200."""
    answers: list[Answer] = []
    await closed_loop(port, REQUEST, MAX_QUEUE, answers, lambda: len(answers) >= per_client * MAX_QUEUE)
    return [a.status for a in answers]


def test_bursts_refuse_only_excess_at_once_lose_nothing_keep_rss_flat_and_recover(srv: ServerProcess):
    baseline = asyncio.run(_at_capacity(srv.port))
    warm = asyncio.run(_burst(srv.url, srv.port))
    rss = [rss_kb(srv.pid)]
    bursts = []
    for _ in range(BURSTS):
        b = asyncio.run(_burst(srv.url, srv.port))
        rss.append(rss_kb(srv.pid))
        bursts.append(b)

    # Recovery: right after the last burst, the admitted concurrency is never refused.
    recovery = asyncio.run(_at_capacity(srv.port))
    rss_after = rss_kb(srv.pid)

    keep = ("accepted", "refused", "batches", "images", "probes_sent", "refused_without_body", "max_depth",
            "fewest_admitted_at_refusal")
    summary = [{k: b[k] for k in keep} for b in bursts]
    record("overload", capacity=MAX_QUEUE, max_batch=MAX_BATCH, clients=CLIENTS, accepted_per_burst=ACCEPTED_PER_BURST,
           bursts=len(bursts), warmup_bursts=1,
           requests=sum(b["accepted"] + b["refused"] for b in [warm, *bursts]),
           accepted=sum(b["accepted"] for b in bursts), refused=sum(b["refused"] for b in bursts),
           per_burst=summary, rss_kb=rss, rss_kb_after_recovery=rss_after,
           recovery_requests=len(recovery), recovery_ok=recovery.count(200))

    for b in [warm, *bursts]:
        assert not b["other"], b["other"][:3]  # only 200 or 503: nothing dropped, nothing else
        assert b["accepted"] >= ACCEPTED_PER_BURST, f"{b['accepted']} accepted within {BURST_DEADLINE_S} s"
        assert b["refused"] > 0
        for a in b["refused_answers"]:
            err = check_error(a.status, a.headers, a.body)
            assert err["code"] == "overloaded" and int(a.headers["retry-after"]) >= 1
        # Refused only when full (admitted up to the bound), and never more queued than the bound.
        assert b["fewest_admitted_at_refusal"] >= MAX_QUEUE, summary
        assert b["depth_samples"] and b["max_depth"] <= MAX_QUEUE, summary
        # An answered probe was refused, or admitted and (after EFFNET_BODY_TIMEOUT_S) told its body never came.
        assert all(p.startswith("HTTP/1.1 408") for p in b["probes_other"]), b["probes_other"]
    assert sum(b["refused_without_body"] for b in bursts) >= 1, summary
    # RSS: flat across the measured bursts (the warm-up burst grew the arenas once).
    assert rss[-1] <= rss[0] * (1 + RSS_GROWTH), rss
    assert baseline == [200] * len(baseline)
    assert recovery == [200] * len(recovery)
    assert srv.alive()
