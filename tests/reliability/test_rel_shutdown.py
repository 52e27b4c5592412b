"""SIGTERM mid-burst on a real `effnet serve` process running a real EfficientNet.

tests/serving/test_serve_shutdown.py already shows that queued requests are answered and
the exit code is 0. This adds what it leaves open: requests arriving *after* the signal,
while the accepted ones are still being finished, are refused (connection refused, or 503
shutting_down) and never hang or get served; the exit comes within EFFNET_DRAIN_S; and the
accepted requests are counted for the report (lost must be 0).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
from reliability_helpers import (
    JPEG,
    ServerProcess,
    check_error,
    encode,
    metric,
    real_photo,
    record,
)

DRAIN_S = 10
ACCEPTED = 24
IMAGE = encode(real_photo((160, 106)), "JPEG")
LATE = 5
# How a request that arrives after SIGTERM may be refused: the app answers 503 shutting_down, or
# the listening socket is already closed and the connection is refused. A timeout, a dropped
# connection after the request was sent, or any other answer is a failure.
REFUSED_OUTCOMES = {"503 shutting_down", "connection refused"}


def _late_outcome(r: httpx.Response | Exception) -> str:
    if isinstance(r, httpx.Response):
        code = check_error(r.status_code, r.headers, r.content)["code"] if r.status_code >= 400 else "served"
        return f"{r.status_code} {code}"
    if isinstance(r, httpx.ConnectError) and _refused(r):
        return "connection refused"
    return f"{type(r).__name__}: {r}"


def _refused(exc: BaseException | None) -> bool:
    """ECONNREFUSED somewhere down the chain (httpx wraps it in two layers of ConnectError)."""
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def test_sigterm_mid_burst_loses_no_accepted_request_refuses_new_ones_and_exits_0_in_time(
    tiny_repo: Path, tmp_path: Path,
):
    env = {
        "EFFNET_REPOSITORY": str(tiny_repo), "EFFNET_MODELS": "tiny", "EFFNET_DEFAULT_MODEL": "tiny",
        "EFFNET_MAX_BATCH": "32", "EFFNET_MAX_QUEUE": "64",
        "EFFNET_MAX_DELAY_MS": "2500",  # the accepted requests are still queued when the signal comes
        "EFFNET_BATCH_WAIT": "always",  # ... even once all of them are decoded
        "EFFNET_DRAIN_S": str(DRAIN_S),
    }
    srv = ServerProcess(env, tmp_path / "server.log").start()
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                burst = [asyncio.create_task(c.post("/classify", content=IMAGE, headers=JPEG)) for _ in range(ACCEPTED)]
                while metric((await c.get("/metrics")).text, "effnet_queue_depth", model="tiny") < ACCEPTED:
                    assert not any(t.done() for t in burst)
                    await asyncio.sleep(0.02)
                signalled = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                # New arrivals while the accepted ones are being finished: each on a fresh connection.
                late = []
                async with httpx.AsyncClient(base_url=srv.url, timeout=30) as fresh:
                    for _ in range(LATE):
                        try:
                            late.append(await fresh.post("/classify", content=IMAGE, headers=JPEG))
                        except httpx.TransportError as exc:
                            late.append(exc)
                        await asyncio.sleep(0.05)
                # The late ones met a server that was still finishing the accepted work, not a dead one.
                still_draining = srv.proc.poll() is None and not all(t.done() for t in burst)
                answered = await asyncio.gather(*burst)
                return signalled, late, still_draining, answered

        signalled, late, still_draining, answered = asyncio.run(scenario())
        rc = srv.proc.wait(timeout=DRAIN_S + 30)
        exit_s = time.monotonic() - signalled
    finally:
        srv.stop()

    outcomes = [_late_outcome(r) for r in late]
    refused = [o for o in outcomes if o in REFUSED_OUTCOMES]
    codes = [r.status_code for r in answered]
    record("shutdown", accepted=ACCEPTED, answered_200=codes.count(200), lost=ACCEPTED - codes.count(200),
           late_requests=len(late), late_refused=len(refused), late_outcomes=sorted(set(outcomes)),
           exit_code=rc, exit_s=round(exit_s, 2), drain_s=DRAIN_S)
    assert codes == [200] * ACCEPTED
    assert len(late) == LATE and still_draining
    assert refused == outcomes, outcomes  # every late request was refused, in one of the two honest ways
    assert rc == 0, srv.log()
    assert exit_s <= DRAIN_S, exit_s
    assert "Traceback" not in srv.log()
