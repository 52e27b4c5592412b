"""SIGTERM mid-burst on a real `effnet serve` process running a real EfficientNet.

tests/serving/test_serve_shutdown.py already shows that queued requests are answered and
the exit code is 0. This adds what it leaves open: requests arriving *after* the signal,
while accepted work is still in flight, are refused (connection refused, or 503
shutting_down) and never hang or get served; the exit comes within EFFNET_DRAIN_S; and the
accepted requests are counted for the report (lost must be 0).

"Still in flight" is made certain, not left to timing: before the signal, one more request is
held open mid-upload (its headers sent with `Expect: 100-continue`, and the server's
`100 Continue` read back, so the app is known to be reading its body). The server must wait
for it, so the late requests meet a draining server by construction; the held request is
completed only once they are all answered.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import httpx
from reliability_helpers import (
    JPEG,
    ServerProcess,
    check_error,
    encode,
    metric,
    read_response,
    real_photo,
    record,
)

# Generous against the drain it bounds (about 3 s here: the queued batch's 2.5 s delay, then inference).
DRAIN_S = 30
ACCEPTED = 24
IMAGE = encode(real_photo((160, 106)), "JPEG")
LATE = 5
# How a request that arrives after SIGTERM may be refused: the app answers 503 shutting_down, or
# the listening socket is already closed and the connection is refused. A timeout, a dropped
# connection after the request was sent, or any other answer is a failure.
REFUSED_OUTCOMES = {"503 shutting_down", "connection refused"}
# The held request's body was still arriving when the signal came: it may be served or refused as
# shutting down, but it must be answered.
HELD_OUTCOMES = {"200 served", "503 shutting_down"}


def _outcome(status: int, headers, body: bytes) -> str:
    return f"{status} {check_error(status, headers, body)['code'] if status >= 400 else 'served'}"


def _late_outcome(r: httpx.Response | Exception) -> str:
    if isinstance(r, httpx.Response):
        return _outcome(r.status_code, r.headers, r.content)
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


def _hold_upload(port: int) -> socket.socket:
    """A /classify request whose body has not been sent, once the app is reading it (100 Continue)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nExpect: 100-continue\r\n"
              b"Content-Length: " + str(len(IMAGE)).encode() + b"\r\n\r\n")
    status, _, _ = read_response(s, timeout=60)
    assert status == 100, status
    return s


def test_sigterm_mid_burst_loses_no_accepted_request_refuses_new_ones_and_exits_0_in_time(
    tiny_repo: Path, tmp_path: Path,
):
    env = {
        "EFFNET_REPOSITORY": str(tiny_repo), "EFFNET_MODELS": "tiny", "EFFNET_DEFAULT_MODEL": "tiny",
        "EFFNET_MAX_BATCH": "32", "EFFNET_MAX_QUEUE": "64",
        "EFFNET_MAX_DELAY_MS": "2500",  # the accepted requests are still queued when the signal comes
        "EFFNET_BATCH_WAIT": "always",  # ... even once all of them are decoded
        "EFFNET_DRAIN_S": str(DRAIN_S),
        # The held upload stays until the test completes it: no upload-rate floor, a body timeout past the test.
        "EFFNET_MIN_UPLOAD_KBPS": "0", "EFFNET_BODY_TIMEOUT_S": str(4 * DRAIN_S),
    }
    srv = ServerProcess(env, tmp_path / "server.log").start()
    held = None
    try:
        held = _hold_upload(srv.port)

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                burst = [asyncio.create_task(c.post("/classify", content=IMAGE, headers=JPEG)) for _ in range(ACCEPTED)]
                # All of them queued (the batch waits 2.5 s from the first, or for 32 images), none answered.
                while metric((await c.get("/metrics")).text, "effnet_queue_depth", model="tiny") < ACCEPTED:
                    assert not any(t.done() for t in burst)
                    await asyncio.sleep(0.02)
                signalled = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                # New arrivals while the held request keeps the server draining: each on a fresh connection.
                late = []
                async with httpx.AsyncClient(base_url=srv.url, timeout=60) as fresh:
                    for _ in range(LATE):
                        try:
                            late.append(await fresh.post("/classify", content=IMAGE, headers=JPEG))
                        except httpx.TransportError as exc:
                            late.append(exc)
                        await asyncio.sleep(0.05)
                # The late ones met a live server still holding accepted work (the held upload, at least).
                alive_while_late = srv.proc.poll() is None
                queued_still_pending = sum(not t.done() for t in burst)
                held.sendall(IMAGE)  # now the held request may finish
                held_answer = await asyncio.to_thread(read_response, held, 60)
                answered = await asyncio.gather(*burst)
                return signalled, late, alive_while_late, queued_still_pending, held_answer, answered

        signalled, late, alive_while_late, queued_pending, held_answer, answered = asyncio.run(scenario())
        rc = srv.proc.wait(timeout=DRAIN_S + 30)
        exit_s = time.monotonic() - signalled
    finally:
        if held is not None:
            held.close()
        srv.stop()

    outcomes = [_late_outcome(r) for r in late]
    refused = [o for o in outcomes if o in REFUSED_OUTCOMES]
    held_outcome = _outcome(*held_answer)
    codes = [r.status_code for r in answered]
    record("shutdown", accepted=ACCEPTED, answered_200=codes.count(200), lost=ACCEPTED - codes.count(200),
           late_requests=len(late), late_refused=len(refused), late_outcomes=sorted(set(outcomes)),
           queued_pending_after_late=queued_pending, held_outcome=held_outcome,
           exit_code=rc, exit_s=round(exit_s, 2), drain_s=DRAIN_S)
    assert codes == [200] * ACCEPTED
    assert len(late) == LATE and alive_while_late
    assert refused == outcomes, outcomes  # every late request was refused, in one of the two honest ways
    assert held_outcome in HELD_OUTCOMES, held_outcome
    assert rc == 0, srv.log()
    assert exit_s <= DRAIN_S, exit_s
    assert "Traceback" not in srv.log()
