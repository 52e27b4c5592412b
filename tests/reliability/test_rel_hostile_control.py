"""Hostile clients against the registry, the metric labels and the work they abandon (issue 21, slice D).

* Loads of names the repository has no folder for leave nothing behind: no entry, no series, readiness
  untouched; a name is matched whole (a trailing newline is not a name).
* `explicit` model control will not start without the API key unless told the port is trusted.
* Cascades a client makes up share one metric label: orderings of the loaded models cannot mint series.
* Clients that leave while their request waits for queue room or for the model are dropped before
  inference: after a storm of such clients, a new client is answered at once, not after the admission wait.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from reliability_helpers import request_bytes
from serving_helpers import encode, live_server, photo, queue_held, write_model

from effnet_serve.core.config import Settings
from effnet_serve.engine.registry import valid_name

ROOT = Path(__file__).resolve().parents[2]
JPEG = {"Content-Type": "image/jpeg"}
KEY = {"X-API-Key": "k3y"}


def small(repo: Path, **kw) -> Settings:
    return Settings(**{"repository": repo, "threads": 1, "decode_workers": 1, "access_log": False, **kw})


def series(metrics: str, name: str) -> list[str]:
    return [line for line in metrics.splitlines() if line.startswith(name + "{")]


# --- the registry ---------------------------------------------------------------------------------
def test_loads_of_missing_folders_leave_no_entry_no_series_and_no_effect_on_readiness(tmp_path):
    write_model(tmp_path, "alpha")
    settings = small(tmp_path, model_control="explicit", api_key="k3y", strict_readiness=True)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30, headers=KEY) as c:
        for name in ("ghost1", "ghost2", "ghost3"):
            r = c.post(f"/v2/repository/models/{name}/load")
            assert r.status_code == 400 and "no model" in r.json()["error"], r.text
            r = c.post(f"/v2/repository/models/{name}/unload")
            assert r.status_code == 400, r.text
        # Even "every model in the repository must serve" holds: the ghosts are not models.
        assert c.get("/health/ready").status_code == 200 and c.get("/v2/health/ready").status_code == 200
        assert [row["name"] for row in c.post("/v2/repository/index").json()] == ["alpha"]
        r = c.post("/classify?model=ghost1", content=encode(photo()), headers=JPEG)
        assert r.status_code == 404 and "ghost" not in r.text
        assert "ghost" not in c.get("/metrics").text
        # A folder that exists and fails to load is still listed with its reason (issue 26).
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "manifest.json").write_text("{}")
        r = c.post("/v2/repository/models/broken/load")
        assert r.status_code == 400 and "manifest.json is invalid" in r.json()["error"]
        row = {r["name"]: r for r in c.post("/v2/repository/index").json()}["broken"]
        assert row["state"] == "UNAVAILABLE" and 'model="broken",outcome="failed"' in c.get("/metrics").text


def test_a_model_name_is_matched_whole_so_a_trailing_newline_is_not_a_name(tmp_path):
    assert valid_name("zz") and not valid_name("zz\n") and not valid_name("zz\nb0") and not valid_name("")
    write_model(tmp_path, "alpha")
    write_model(tmp_path, "zz")
    settings = small(tmp_path, models=["alpha"], model_control="explicit", api_key="k3y")
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30, headers=KEY) as c:
        r = c.post("/v2/repository/models/zz%0A/load")
        assert r.status_code == 400 and "not a valid model name" in r.json()["error"], r.text
        assert [row.get("state") for row in c.post("/v2/repository/index").json()] == ["READY", None]


def test_explicit_model_control_without_a_key_refuses_to_start_and_says_how_to_fix_it(tmp_path):
    with pytest.raises(ValidationError, match="EFFNET_ALLOW_OPEN_CONTROL=true"):
        Settings(repository=tmp_path, model_control="explicit")
    with pytest.raises(ValidationError, match="EFFNET_API_KEY_EXEMPT covers /v2/repository"):
        Settings(repository=tmp_path, model_control="explicit", api_key="k", api_key_exempt="/health,/v2")
    assert Settings(repository=tmp_path, model_control="explicit", allow_open_control=True).model_control == "explicit"
    # The real command: it exits at once with the reason, before binding anything.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")}
    env.update(EFFNET_REPOSITORY=str(tmp_path), EFFNET_MODEL_CONTROL="explicit", EFFNET_GRPC_PORT="0",
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "effnet_serve", "serve", "--port", "0"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "EFFNET_MODEL_CONTROL=explicit lets any client load and unload models" in done.stderr, done.stderr[-2000:]
    assert "EFFNET_API_KEY" in done.stderr


# --- metric labels --------------------------------------------------------------------------------
def test_cascades_a_client_makes_up_share_one_label(tmp_path):
    for seed, name in enumerate(("m1", "m2", "m3")):
        write_model(tmp_path, name, seed=seed)
    settings = small(tmp_path, default_model="m1", default_cascade=["m1", "m2"])
    img = encode(photo())
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        # threshold=1: every image escalates through every stage
        for spec in ("m1,m2", "m2,m1", "m1,m3", "m3,m1", "m2,m3,m1", "m3,m2,m1", "m1,m3,m2"):
            r = c.post(f"/classify?model=cascade:{spec}&threshold=1", content=img, headers=JPEG)
            assert r.status_code == 200, r.text
        found = series(c.get("/metrics").text, "effnet_cascade_escalations_total")
    labels = {line.split('cascade="')[1].split('"')[0] for line in found}
    assert labels == {"m1,m2", "cascade"}, found  # the configured cascade keeps its name
    assert 'effnet_cascade_escalations_total{cascade="m1,m2",from_model="m1",to_model="m2"} 1.0' in found


# --- abandoned work ---------------------------------------------------------------------------------
STORM = 40
LONG_WAIT_MS = 20_000  # the admission wait: what a client would sit through behind the lines the storm left


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    b = "effnet-test-boundary"
    parts = b"".join(f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.jpg\"\r\n"
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + img + b"\r\n" for i, img in enumerate(images))
    return parts + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def until(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


async def storm_then_leave(port: int, request: bytes, room, waiting: int) -> None:
    """STORM clients send a whole request, wait until the server has them all in line, and close."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(STORM)]
    for _, w in conns:
        w.write(request)
    await asyncio.gather(*(w.drain() for _, w in conns))
    deadline = time.monotonic() + 30
    while room.waiting < waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert room.waiting >= waiting, room.waiting
    for _, w in conns:
        w.close()


def wait_settings(repo: Path) -> Settings:
    return small(repo, default_model="m", max_queue=4, admission_wait_ms=LONG_WAIT_MS, max_delay_ms=0)


def test_clients_that_leave_while_waiting_for_queue_room_leave_the_line_at_once(tmp_path):
    """The queue is full; a storm of clients waits for room before their bodies are read (the admission gate,
    or the engine's stage one behind a worker) and leaves. Their places go at once, not after the 20 s
    admission wait: once the queue frees, a new client is answered straight away."""
    write_model(tmp_path, "m")
    img = encode(photo())
    with live_server(wait_settings(tmp_path)) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        room = srv.plane.registry.entries["m"].batcher.room
        with queue_held(srv, "m", 4):  # full: every request of the storm waits in line
            asyncio.run(storm_then_leave(srv.port, request_bytes("/classify", img), room, STORM))
            assert until(lambda: room.waiting == 0), f"{room.waiting} gone clients still wait for room"
        r = c.post("/classify", content=img, headers=JPEG)  # the client's 10 s, not the 20 s wait: timed out
        assert r.status_code == 200, r.text
        assert until(lambda: room.used == 0 and room.waiting == 0)
        # Behind workers, every call the engine was asked to open is answered or dropped: none is left pending.
        for app in getattr(srv, "apps", []):
            assert until(lambda app=app: not app.state.plane._pending), len(app.state.plane._pending)
        metrics = c.get("/metrics").text
    assert 'status="500"' not in metrics  # a client that left is a 499, in a worker process too


def test_clients_that_leave_while_their_images_wait_for_room_give_it_all_back(tmp_path):
    """Admitted (one slot is free) with two images each, so they wait for room for both (stage two) after
    their bodies are in; they leave. None of the room they were waiting for stays held once it frees: in
    worker processes the engine went on waiting for it, and kept it, for a client long gone."""
    write_model(tmp_path, "m")
    body, ctype = multipart([encode(photo(seed=1)), encode(photo(seed=2))])
    with live_server(wait_settings(tmp_path)) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        room = srv.plane.registry.entries["m"].batcher.room
        with queue_held(srv, "m", 3):  # one slot: stage one lets each in, stage two waits for the second
            asyncio.run(storm_then_leave(srv.port, request_bytes("/classify", body, ctype), room, STORM))
            assert until(lambda: room.waiting == 0), f"{room.waiting} gone clients still wait for room"
        assert until(lambda: room.used == 0), f"{room.reserved} slots held for clients that left"
        r = c.post("/classify", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
        assert 'status="500"' not in c.get("/metrics").text
