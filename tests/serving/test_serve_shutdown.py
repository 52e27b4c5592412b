"""Shutdown: `effnet serve` as a real process loses no accepted request on SIGTERM and exits 0;
requests that arrive while draining are refused as shutting_down."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from effnet_serve.core.config import Settings
from effnet_serve.core.errors import ShuttingDown
from effnet_serve.engine.metrics import Metrics
from effnet_serve.engine.registry import ModelEntry, Registry
from effnet_serve.engine.dataplane import DataPlane
from serving_helpers import encode, photo

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_mid_burst_finishes_queued_requests_and_exits_0(fake_repo):
    port = free_port()
    env = {
        **os.environ,
        "EFFNET_REPOSITORY": str(fake_repo),
        "EFFNET_MODELS": "fake",
        "EFFNET_MAX_BATCH": "32",
        "EFFNET_MAX_DELAY_MS": "3000",  # requests sit in the queue when the signal arrives
        "EFFNET_BATCH_WAIT": "always",  # ... even once all of them are decoded
        "EFFNET_DRAIN_S": "10",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "effnet_serve", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)

        image = encode(photo((96, 96)))

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                tasks = [
                    asyncio.create_task(c.post("/classify", content=image, headers={"content-type": "image/jpeg"}))
                    for _ in range(16)
                ]
                # Signal only once every request is accepted and waiting in the queue.
                while 'effnet_queue_depth{model="fake"} 16.0' not in (await c.get("/metrics")).text:
                    assert not any(t.done() for t in tasks)
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 16
        assert proc.wait(timeout=30) == 0
        try:
            httpx.get(url + "/health/live", timeout=1)
            raise AssertionError("still accepting after shutdown")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_a_request_during_shutdown_is_told_shutting_down_even_after_its_model_is_closed(tmp_path):
    """Shutdown closes the registry after draining; a late request that still reaches the app must
    hear the real reason (shutting_down, retry soon elsewhere), not model_unavailable. CI once
    caught this ordering only by timing; here it is forced."""
    settings = Settings(repository=tmp_path)
    plane = DataPlane(settings, Registry(settings), Metrics(), ThreadPoolExecutor(1))
    plane.draining = True
    closed = ModelEntry(name="b0", folder=tmp_path, status="unavailable", reason="closed")
    with pytest.raises(ShuttingDown) as caught:
        plane.check_admissible(closed)
    assert caught.value.code == "shutting_down" and caught.value.headers["Retry-After"] == "5"
    plane.decode_pool.shutdown()
