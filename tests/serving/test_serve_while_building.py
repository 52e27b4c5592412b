"""`make serve` serves while it builds: a build announces the models it has left (build/repository.py
BuildAnnouncement), `/health/ready` lists them (app/engine/building.py), and a polling server serves each
model once the build renames it into place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx

from effnet_serve.core.config import Settings
from effnet_serve.engine import building
from effnet_build.repository import BUILDING_FILE, BuildAnnouncement
from serving_helpers import encode, live_server, photo


def test_the_build_and_the_server_agree_on_the_file():
    assert BUILDING_FILE == building.FILE


def test_an_announcement_lists_what_is_left_and_goes_when_the_build_ends(tmp_path):
    with BuildAnnouncement(tmp_path, ["b0", "lite0", "b4"]) as announced:
        assert building.pending(tmp_path) == ["b0", "lite0", "b4"]
        announced.done("b0")
        assert building.pending(tmp_path) == ["lite0", "b4"]
    assert not (tmp_path / BUILDING_FILE).exists() and building.pending(tmp_path) == []
    try:
        with BuildAnnouncement(tmp_path, ["b7"]):
            raise KeyboardInterrupt  # a build stopped half way says nothing more either
    except KeyboardInterrupt:
        pass
    assert building.pending(tmp_path) == []


def test_a_file_left_by_a_killed_build_or_a_broken_one_means_nothing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / BUILDING_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                      "models": ["b7"]}))
    assert building.pending(tmp_path) == []
    for junk in ("not json", "[]", '{"models": "b7"}', '{"pid": 1, "host": "h"}'):
        (tmp_path / BUILDING_FILE).write_text(junk)
        assert building.pending(tmp_path) == []


def _ready(srv) -> tuple[int, dict]:
    r = httpx.get(srv.url + "/health/ready", timeout=10)
    return r.status_code, r.json()


def test_a_polling_server_serves_what_a_build_writes_behind_it(tmp_path, tiny_repo):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    settings = Settings(repository=repo, model_control="poll", poll_s=0.2, threads=1)
    with live_server(settings) as srv:
        status, body = _ready(srv)
        assert status == 200 and body["models"] == ["tiny"] and "building" not in body
        # A build that has yet to reach a model that serves already does not list it as coming.
        with BuildAnnouncement(repo, ["tiny", "later"]):
            assert _ready(srv)[1]["building"] == ["later"]
        # The build of tiny2 (a real one, a few seconds of PyTorch) runs beside the server, as `make serve` does.
        build = subprocess.Popen(
            [sys.executable, "-m", "effnet_serve", "build", "--repo", str(repo), "--quiet", "--width", "0.35", "--depth", "0.25",
             "--resolution", "96", "--name", "tiny2", "--weights", "random"],
            env={k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen_building = False
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status, body = _ready(srv)
            assert status == 200  # the models asked for at start serve all along
            seen_building |= body.get("building") == ["tiny2"]
            if "tiny2" in body["models"]:
                break
            time.sleep(0.1)
        _, err = build.communicate(timeout=120)
        assert build.returncode == 0, err
        assert "tiny2" in body["models"] and "building" not in body
        assert seen_building, "the build was never listed while it ran"
        r = httpx.post(srv.url + "/classify?model=tiny2", content=encode(photo(seed=1)),
                       headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "tiny2"
        assert not (repo / BUILDING_FILE).exists()
