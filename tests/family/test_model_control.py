"""Model control (the V2 repository extension, EFFNET_MODEL_CONTROL): models loaded, reloaded and unloaded
while the server runs, by request (explicit) or by watching the repository (poll), with real clients."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from serving_helpers import encode, live_server, photo, write_model
from tritonclient.utils import InferenceServerException

from effnet_serve.core.config import Settings
from effnet_serve.engine.control import changed, fingerprint

JPEG = {"Content-Type": "image/jpeg"}
PHOTO = encode(photo())


def publish(repo: Path, name: str, seed: int, crop: int = 32) -> Path:
    """Write a model the way the build does: into a hidden folder, renamed into place once complete."""
    staging = repo / f".staging-{name}-{seed}"
    shutil.rmtree(staging, ignore_errors=True)
    write_model(staging.parent, staging.name, crop=crop, resize=crop + 4, seed=seed)
    manifest = (staging / "manifest.json").read_text().replace(f'"name": "{staging.name}"', f'"name": "{name}"')
    (staging / "manifest.json").write_text(manifest)
    final = repo / name
    if final.exists():
        old = repo / f".old-{name}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    return final


def version(c: httpx.Client, name: str) -> str:
    return c.get(f"/v2/models/{name}").json()["versions"][0]


def soon(check, timeout_s: float = 5.0) -> bool:
    """check() within a moment. With worker processes, /v2/models and readiness are answered from the engine's
    state as each worker last heard it: the engine sends it to every worker before it answers a load, but a
    worker other than the one asked may answer a request just before it reads that message (README, Processes)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def repo(tmp_path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    publish(r, "alpha", seed=0)
    return r


def test_explicit_load_serve_reload_unload_with_tritonclient(repo):
    settings = Settings(repository=repo, model_control="explicit", allow_open_control=True, threads=1, decode_workers=2)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        publish(repo, "beta", seed=1)  # built while the server runs
        client = triton_http.InferenceServerClient(srv.url.removeprefix("http://"))
        index = {row["name"]: row for row in client.get_model_repository_index()}
        assert index["alpha"]["state"] == "READY" and index["beta"] == {"name": "beta"}  # never loaded
        assert c.post("/classify?model=beta", content=PHOTO, headers=JPEG).status_code == 404

        client.load_model("beta")
        assert client.is_model_ready("beta")
        assert c.post("/classify?model=beta", content=PHOTO, headers=JPEG).status_code == 200
        v1 = version(c, "beta")

        publish(repo, "beta", seed=2)  # rebuilt: a new ONNX file
        client.load_model("beta")
        assert soon(lambda: version(c, "beta") != v1) and c.get("/models/beta").json()["status"] == "ready"

        client.unload_model("beta")
        assert soon(lambda: not client.is_model_ready("beta"))
        rows = {row["name"]: row for row in c.post("/v2/repository/index").json()}
        assert rows["beta"]["state"] == "UNAVAILABLE" and rows["beta"]["reason"] == "unloaded"
        assert c.post("/v2/repository/index", json={"ready": True}).json() == [rows["alpha"]]
        assert c.get("/health/ready").status_code == 200  # an unloaded model does not make the pod unready
        r = c.post("/classify?model=beta", content=PHOTO, headers=JPEG)
        assert r.status_code == 503 and "unloaded" in r.json()["error"]["message"]

        metrics = c.get("/metrics").text
        assert 'effnet_model_loads_total{model="beta",outcome="ok"} 2.0' in metrics
        assert 'effnet_model_unloads_total{model="beta"} 1.0' in metrics
        assert f'effnet_model_version_info{{model="alpha",version="{version(c, "alpha")}"}} 1.0' in metrics
        assert 'model="beta"' not in "\n".join(ln for ln in metrics.splitlines() if ln.startswith("effnet_model_info"))


def test_a_broken_reload_keeps_the_old_version_serving_and_says_why(repo):
    settings = Settings(repository=repo, model_control="explicit", allow_open_control=True, threads=1)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        before = version(c, "alpha")
        (repo / "alpha" / "model.onnx").write_bytes(b"not an onnx file")  # its checksum no longer matches
        r = c.post("/v2/repository/models/alpha/load")
        assert r.status_code == 400
        assert "does not match" in r.json()["error"] and "previous version keeps serving" in r.json()["error"]
        assert version(c, "alpha") == before
        assert c.post("/classify?model=alpha", content=PHOTO, headers=JPEG).status_code == 200
        assert 'effnet_model_loads_total{model="alpha",outcome="failed"} 1.0' in c.get("/metrics").text


def test_a_reload_under_steady_load_loses_no_request(repo):
    settings = Settings(repository=repo, model_control="explicit", allow_open_control=True, threads=1, decode_workers=2)
    with live_server(settings) as srv:
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                while not stop.is_set():
                    statuses.append(c.post("/classify?model=alpha", content=PHOTO, headers=JPEG).status_code)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            versions = {version(c, "alpha")}
            for seed in (5, 6, 7):
                publish(repo, "alpha", seed=seed)
                assert c.post("/v2/repository/models/alpha/load").status_code == 200
                versions.add(version(c, "alpha"))
                time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
    assert len(versions) == 4  # every rebuild was swapped in
    assert len(statuses) > 20 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def until(check, seconds=10.0) -> bool:
    """Poll `check` until it holds or the deadline passes (the poll's timing is the server's business)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_poll_mode_follows_the_repository_by_itself(repo):
    settings = Settings(repository=repo, model_control="poll", poll_s=0.2, threads=1)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        publish(repo, "gamma", seed=3)
        assert until(lambda: c.get("/v2/models/gamma/ready").status_code == 200)
        assert c.post("/classify?model=gamma", content=PHOTO, headers=JPEG).status_code == 200
        before = version(c, "gamma")
        publish(repo, "gamma", seed=4)
        assert until(lambda: version(c, "gamma") != before)
        shutil.rmtree(repo / "gamma")
        assert until(lambda: c.get("/v2/models/gamma/ready").status_code == 503)
        r = c.post("/v2/repository/models/gamma/load")
        assert r.status_code == 403 and "poll" in r.json()["error"]  # the repository decides, not requests


def test_without_model_control_requests_cannot_change_what_serves_and_names_are_checked(repo):
    with live_server(Settings(repository=repo, threads=1)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v2/repository/models/alpha/unload")
        assert r.status_code == 403 and "EFFNET_MODEL_CONTROL" in r.json()["error"]
        assert c.post("/v2/repository/models/Not_A_Name/load").status_code == 400
        assert c.post("/v2/repository/models/..%2Fetc/load").status_code in (400, 404)
        assert c.post("/v2/repository/index", content=b"[1, 2]").status_code == 400
        with pytest.raises(InferenceServerException):
            triton_http.InferenceServerClient(srv.url.removeprefix("http://")).load_model("alpha")


def test_the_repository_endpoints_need_the_api_key(repo):
    settings = Settings(repository=repo, model_control="explicit", api_key="k3y", threads=1)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v2/repository/index").status_code == 401
        assert c.post("/v2/repository/models/alpha/unload").status_code == 401
        assert c.post("/v2/repository/index", headers={"X-API-Key": "k3y"}).status_code == 200


# --- poll: every change seen, drift reported, readiness (issue 26) ------------------------------------
POLL = {"model_control": "poll", "poll_s": 0.2, "threads": 1}


def index_row(c: httpx.Client, name: str) -> dict:
    return {row["name"]: row for row in c.post("/v2/repository/index").json()}.get(name, {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_in(repo: Path, name: str, manifest: str) -> None:
    """A folder with just a manifest, renamed into place whole (so the poll never reads half of it)."""
    staging = repo / f".staging-{name}"
    staging.mkdir()
    (staging / "manifest.json").write_text(manifest)
    os.replace(staging, repo / name)


def test_the_fingerprint_follows_content_not_timestamps(tmp_path):
    folder = write_model(tmp_path, "alpha")
    onnx = folder / "model.onnx"
    tick = 0.02  # past the file system's clock tick, so every write below gets a new ctime
    first = fingerprint(folder, {})
    assert set(first) == {"manifest.json", "model.onnx"} and not changed(first, fingerprint(folder, first))
    time.sleep(tick)
    os.utime(onnx)
    hashed = fingerprint(folder, first)
    assert changed(first, hashed)  # first seen unhashed: any new stat counts, and now it is hashed
    time.sleep(tick)
    os.utime(onnx)  # touched again: the same bytes
    assert not changed(hashed, fingerprint(folder, hashed))
    st = onnx.stat()
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 1
    time.sleep(tick)
    onnx.write_bytes(data)
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, mtime put back (cp -p, rsync -t)
    assert changed(hashed, fingerprint(folder, hashed))
    (folder / "labels.txt").write_text("a file beside them is part of the version too\n")
    assert changed(hashed, fingerprint(folder, hashed))


def test_poll_sees_an_onnx_file_truncated_in_place_and_says_so_once(repo, caplog):
    caplog.set_level(logging.INFO, logger="effnet")
    with live_server(Settings(repository=repo, **POLL)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        serving = version(c, "alpha")
        onnx = repo / "alpha" / "model.onnx"
        good = onnx.read_bytes()
        with onnx.open("r+b") as f:  # the same file, half its bytes: as an interrupted cp or rsync --inplace
            f.truncate(len(good) // 2)

        assert until(lambda: "reason" in index_row(c, "alpha"))
        row = index_row(c, "alpha")
        assert row["state"] == "READY" and row["version"] == serving, row
        assert "does not match" in row["reason"] and f"version {serving} serves" in row["reason"], row
        assert f"candidate {serving}" in row["reason"]  # what its (unchanged) manifest declares
        # /v2/models/{m} and /models/{m} say it too (split in processes, a worker has it from the engine's push).
        assert until(lambda: c.get("/v2/models/alpha").json().get("reason") == row["reason"])
        meta = c.get("/v2/models/alpha").json()
        assert meta["versions"] == [serving] and meta["state"] == "READY"
        assert c.get("/models/alpha").json()["reason"] == row["reason"]
        assert c.post("/classify?model=alpha", content=PHOTO, headers=JPEG).status_code == 200  # old one serves
        assert c.get("/health/ready").status_code == 200
        metrics = c.get("/metrics").text
        assert 'effnet_model_reload_failures_total{model="alpha"} 1.0' in metrics
        assert 'effnet_model_disk_drift{model="alpha"} 1.0' in metrics

        time.sleep(1.0)  # five more polls of the unchanged folder: none of them says it again
        said = [r for r in caplog.records if r.name == "effnet.control" and r.levelno >= logging.ERROR]
        assert len(said) == 1 and "alpha" in said[0].getMessage(), [r.getMessage() for r in said]

        onnx.write_bytes(good)  # repaired in place
        assert until(lambda: "reason" not in index_row(c, "alpha"))
        assert version(c, "alpha") == serving
        assert 'effnet_model_disk_drift{model="alpha"} 0.0' in c.get("/metrics").text


def test_a_manifest_broken_in_place_is_reported_in_the_index_and_even_a_strict_server_stays_ready(repo):
    settings = Settings(repository=repo, strict_readiness=True, grpc_port=free_port(), **POLL)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        serving = version(c, "alpha")
        (repo / "alpha" / "manifest.json").write_text("{}")
        assert until(lambda: "reason" in index_row(c, "alpha"))
        row = index_row(c, "alpha")
        assert row["state"] == "READY" and row["version"] == serving
        assert "candidate on disk" in row["reason"] and "manifest.json is invalid" in row["reason"], row
        grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{srv.app.state.grpc.port}")
        rows = {r.name: r for r in grpc.get_model_repository_index().models}
        assert rows["alpha"].state == "READY" and rows["alpha"].reason == row["reason"]
        grpc.close()
        # The old version serves, so even "every model must serve" holds.
        assert c.get("/health/ready").status_code == 200 and c.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("strict", [None, True], ids=["default", "strict"])
def test_a_bogus_new_folder_is_listed_unavailable_and_takes_the_server_out_only_when_strict(repo, strict):
    settings = Settings(repository=repo, strict_readiness=strict, **POLL)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/health/ready").status_code == 200
        drop_in(repo, "evil", "{}")
        assert until(lambda: index_row(c, "evil").get("state") == "UNAVAILABLE")
        assert "manifest.json is invalid" in index_row(c, "evil")["reason"]
        assert 'effnet_model_loads_total{model="evil",outcome="failed"} 1.0' in c.get("/metrics").text
        # With worker processes readiness comes from the engine's last pushed state (at most 50 ms old), which
        # may still say "loading": wait for the reason, not only for the model's name.
        if strict:  # EFFNET_STRICT_READINESS=1: every model in the repository must serve
            assert until(lambda: "manifest.json is invalid" in c.get("/health/ready").json().get("error", {})
                         .get("models", {}).get("evil", ""))
            assert c.get("/health/ready").status_code == 503
            assert c.get("/v2/health/ready").status_code == 503
        else:  # nobody asked for it: the server stays in rotation, and says what is wrong beside "ready"
            assert until(lambda: "manifest.json is invalid" in (c.get("/health/ready").json().get("unavailable") or {})
                         .get("evil", ""))
            r = c.get("/health/ready")
            assert r.status_code == 200 and r.json()["models"] == ["alpha"], r.text
            assert "manifest.json is invalid" in r.json()["unavailable"]["evil"]
            assert c.get("/v2/health/ready").status_code == 200
        assert c.post("/classify?model=alpha", content=PHOTO, headers=JPEG).status_code == 200


def test_a_restart_with_a_broken_model_on_disk_is_unready_until_repaired_when_it_was_asked_for(repo):
    publish(repo, "beta", seed=1)
    onnx = repo / "alpha" / "model.onnx"
    good = onnx.read_bytes()
    onnx.write_bytes(good[: len(good) // 2])  # left broken by the last run
    # Every folder present at start is asked for: not ready, while the others serve and the broken one says why.
    with live_server(Settings(repository=repo, **POLL)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503 and "does not match" in r.json()["error"]["models"]["alpha"], r.text
        assert index_row(c, "alpha")["state"] == "UNAVAILABLE" and "does not match" in index_row(c, "alpha")["reason"]
        assert c.post("/classify?model=beta", content=PHOTO, headers=JPEG).status_code == 200
        onnx.write_bytes(good)  # repaired: the poll loads it, and the server turns ready
        assert until(lambda: c.get("/health/ready").status_code == 200)
        assert c.post("/classify?model=alpha", content=PHOTO, headers=JPEG).status_code == 200
    # EFFNET_MODELS=beta: alpha is not asked for. The poll still tries it and lists it; the server is ready.
    onnx.write_bytes(good[: len(good) // 2])
    settings = Settings(repository=repo, models=["beta"], **POLL)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert until(lambda: index_row(c, "alpha").get("state") == "UNAVAILABLE")
        assert until(lambda: "alpha" in (c.get("/health/ready").json().get("unavailable") or {}))
        assert c.get("/health/ready").status_code == 200
