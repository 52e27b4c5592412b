"""Security properties of the serving path, each shown on a running server.

Already covered elsewhere and only referenced here: the upload bound (test_rel_inputs.py's
413 cases answer while most of the body is still unsent), the leak check on every error
answer (test_rel_inputs.py, test_rel_fuzz.py, test_rel_faults.py all go through
reliability_helpers.check_error), and the basic API-key cases (tests/serving/test_serve_api.py).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image
from reliability_helpers import (
    JPEG,
    ROOT,
    check_error,
    encode,
    raw_request,
    real_photo,
    record,
)
from serving_helpers import live_server, write_model

from effnet_serve.core.config import Settings

PHOTO = encode(real_photo((200, 133)), "JPEG")


def test_no_file_path_ever_comes_from_the_request(tmp_path: Path):
    """A real, loadable model sits exactly where `../../x` would lead from the repository; asking
    for it by that name is a 404, and the server opens or lists nothing while answering."""
    repo = tmp_path / "a" / "b" / "repo"
    write_model(repo, "fake")
    write_model(tmp_path / "a", "x")  # repo/../../x
    write_model(tmp_path, "passwd")
    events: list[tuple[str, str]] = []
    watching = threading.Event()

    def hook(event: str, args: tuple) -> None:
        if watching.is_set() and event in ("open", "os.listdir", "os.scandir", "os.chdir", "os.stat"):
            events.append((event, str(args[0]) if args else ""))

    sys.addaudithook(hook)  # cannot be removed; inert unless `watching` is set
    hostile = ["../../x", "../../x/", "..%2F..%2Fx", str(tmp_path / "a" / "x"), "../../../passwd", "x", "passwd"]
    with live_server(Settings(repository=repo, default_model="fake", threads=1)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            watching.set()
            try:
                answers = [c.post("/classify", params={"model": m}, content=PHOTO, headers=JPEG) for m in hostile]
                answers += [c.get(f"/models/{m}") for m in ("x", "..%2F..%2Fx", "passwd")]
                answers.append(c.post("/classify", content=PHOTO, headers=JPEG))  # and a good one, for contrast
            finally:
                watching.clear()
    for r in answers[:-1]:
        assert r.status_code == 404 and check_error(r.status_code, r.headers, r.content)["code"] in ("unknown_model", "not_found")
    assert answers[-1].status_code == 200
    touched = [e for e in events if str(tmp_path) in e[1] or "passwd" in e[1]]
    assert not touched, touched
    record("security", check="no file path from the request",
           outcome=f"{len(hostile) + 3} path-like names -> 404 although a loadable model sat at ../../x; "
           f"0 filesystem accesses under the repository while answering (audit hook)")


# pytest resets warning filters per test; this restores the one app.engine.preprocess sets for production.
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_pixel_limit_is_set_explicitly_from_settings(tmp_path: Path):
    write_model(tmp_path, "fake")
    before = Image.MAX_IMAGE_PIXELS
    try:
        with live_server(Settings(repository=tmp_path, default_model="fake", max_image_pixels=1_000_000)) as srv:
            assert Image.MAX_IMAGE_PIXELS == 1_000_000
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                under = c.post("/classify", content=encode(real_photo((1000, 1000)), "PNG"), headers={"content-type": "image/png"})
                over = c.post("/classify", content=encode(real_photo((1001, 1000)), "PNG"), headers={"content-type": "image/png"})
    finally:
        Image.MAX_IMAGE_PIXELS = before
    assert under.status_code == 200
    assert over.status_code == 400 and "pixels" in check_error(400, over.headers, over.content)["message"]
    assert Settings().max_image_pixels == 50_000_000  # our default, not Pillow's 89 Mpx
    record("security", check="Pillow MAX_IMAGE_PIXELS set explicitly",
           outcome="EFFNET_MAX_IMAGE_PIXELS=1000000 -> Image.MAX_IMAGE_PIXELS == 1000000; 1000x1000 -> 200, 1001x1000 -> 400")


SERVE_ONE = textwrap.dedent('''
    import json, socket, sys, threading, time
    repo, image_path = sys.argv[1], sys.argv[2]
    found = {"pickle": 0, "writes": []}

    def hook(event, args):
        if event == "pickle.find_class":
            found["pickle"] += 1
        elif event == "open" and args and repo in str(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & 0o3):
                found["writes"].append(str(args[0]))

    sys.addaudithook(hook)
    import httpx, uvicorn
    from effnet_serve.core.config import Settings
    from effnet_serve.api.server import create_app

    app = create_app(Settings(repository=repo, models=["tiny"], threads=1))
    sock = socket.socket(); sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    for _ in range(600):
        try:
            if httpx.get(url + "/health/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    r = httpx.post(url + "/classify", content=open(image_path, "rb").read(), headers={"content-type": "image/jpeg"})
    server.should_exit = True
    print(json.dumps({"status": r.status_code, "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")),
                      "pickle_loads": found["pickle"], "writes": found["writes"]}))
''')


def test_serving_path_imports_no_torch_loads_no_pickle_and_writes_nothing_to_the_models(tiny_repo: Path, tmp_path: Path):
    image = tmp_path / "cat.jpg"
    image.write_bytes(PHOTO)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SERVE_ONE, str(tiny_repo), str(image)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == 200
    assert result["torch"] == [], result
    assert result["pickle_loads"] == 0
    assert result["writes"] == []  # a read-only model directory is enough
    record("security", check="no torch import, no pickle load, model directory only read",
           outcome="fresh process: create_app + load + serve one real request -> 200; torch modules: 0; "
           "pickle.find_class events: 0; writes under the repository: 0")


def test_api_key_is_compared_in_constant_time_and_exemptions_are_configurable(tmp_path: Path):
    from effnet_serve.api.security import ApiKeyMiddleware

    source = inspect.getsource(ApiKeyMiddleware._authorised)
    assert "hmac.compare_digest" in source and "== self.key" not in source
    write_model(tmp_path, "fake")
    key = {"x-api-key": "s3cret"}
    seen = {}
    for exempt in (["/health/live"], []):
        with live_server(Settings(repository=tmp_path, default_model="fake", api_key="s3cret", api_key_exempt=exempt)) as srv:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                for path in ("/health/live", "/health/ready", "/metrics", "/models", "/openapi.json"):
                    seen[(tuple(exempt), path)] = (c.get(path).status_code, c.get(path, headers=key).status_code)
                # Refused before the body: headers announce 5 MB that never come, the 401 comes anyway.
                status, headers, body = raw_request(
                    srv.port, "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                    "Content-Length: 5000000\r\n\r\n", b"", timeout=10)
                assert status == 401 and check_error(status, headers, body)["code"] == "unauthorized"
                assert headers.get("www-authenticate") == "Bearer"
                assert c.post("/classify", content=PHOTO, headers={**JPEG, "authorization": "Bearer s3cret"}).status_code == 200
                assert c.post("/classify", content=PHOTO, headers={**JPEG, "x-api-key": "S3CRET"}).status_code == 401
    assert seen[(("/health/live",), "/health/live")] == (200, 200)
    for path in ("/health/ready", "/metrics", "/models", "/openapi.json"):
        assert seen[(("/health/live",), path)] == (401, 200), path
    for path in ("/health/live", "/health/ready", "/metrics", "/models"):
        assert seen[((), path)] == (401, 200), path
    record("security", check="API key: constant-time compare, 401 without it, exemptions configurable",
           outcome="hmac.compare_digest in ApiKeyMiddleware; EFFNET_API_KEY_EXEMPT=/health/live guards /health/ready and "
           "/metrics; empty exemption guards everything; 401 sent before the body is read")


def test_cors_is_off_by_default_and_only_for_configured_origins(tmp_path: Path):
    write_model(tmp_path, "fake")
    evil = {"origin": "https://evil.example"}
    preflight = {**evil, "access-control-request-method": "POST"}
    with live_server(Settings(repository=tmp_path, default_model="fake")) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            off = [c.get("/models", headers=evil), c.post("/classify", content=PHOTO, headers={**JPEG, **evil}),
                   c.options("/classify", headers=preflight)]
    assert all("access-control-allow-origin" not in r.headers for r in off)
    with live_server(Settings(repository=tmp_path, default_model="fake", cors_origins=["https://app.example"])) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            good = c.get("/models", headers={"origin": "https://app.example"})
            bad = c.get("/models", headers=evil)
    assert good.headers.get("access-control-allow-origin") == "https://app.example"
    assert "access-control-allow-origin" not in bad.headers
    record("security", check="CORS off by default",
           outcome="no Access-Control-Allow-Origin on cross-origin GET, POST or preflight; "
           "with EFFNET_CORS_ORIGINS only the listed origin gets one")


def test_a_bug_in_the_handler_answers_a_plain_500_without_internals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No path is expected to reach the catch-all; this forces one to show what it would say."""
    from effnet_serve.engine.dataplane import ImageResult

    def broken(*_a, **_k):
        raise KeyError("/work/secret/model.onnx in InferenceSession.run")

    write_model(tmp_path, "fake")
    with live_server(Settings(repository=tmp_path, default_model="fake")) as srv:
        monkeypatch.setattr(ImageResult, "top", broken)
        r = httpx.post(srv.url + "/classify", content=PHOTO, headers=JPEG, timeout=30)
        monkeypatch.undo()
        after = httpx.post(srv.url + "/classify", content=PHOTO, headers=JPEG, timeout=30)
    assert r.status_code == 500
    assert check_error(r.status_code, r.headers, r.content) == {"code": "internal_error", "message": "internal error"}
    assert "secret" not in r.text and "KeyError" not in r.text
    assert after.status_code == 200
    record("security", check="errors never echo internals",
           outcome="every error answer of the campaigns checked for tracebacks, paths and exception class names: none; "
           "a forced handler bug answers {internal_error, 'internal error'} and the next request is 200")
