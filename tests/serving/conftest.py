"""Fixtures for the serving tests. The real EfficientNet fixtures (`tiny_repo`,
`lite0_repo`) come from tests/conftest.py; these use hand-made ONNX models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from effnet_serve.core.config import Settings
from serving_helpers import LiveServer, encode, live_server, photo, write_model


@pytest.fixture(scope="session")
def fake_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good models (`fake`, `fake2`) and three broken ones, each broken differently."""
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "fake", crop=32, resize=36, seed=0)
    write_model(repo, "fake2", crop=48, resize=56, seed=1)
    bad = write_model(repo, "badsum")
    m = json.loads((bad / "manifest.json").read_text())
    m["onnx"]["sha256"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(m))
    trunc = write_model(repo, "truncated")
    data = (trunc / "model.onnx").read_bytes()[:200]
    (trunc / "model.onnx").write_bytes(data)  # checksum matches the truncated file: ORT must refuse it
    m = json.loads((trunc / "manifest.json").read_text())
    m["onnx"]["sha256"] = hashlib.sha256(data).hexdigest()
    (trunc / "manifest.json").write_text(json.dumps(m))
    nofile = write_model(repo, "nofile")
    (nofile / "model.onnx").unlink()
    (repo / ".tmp-building").mkdir()  # a build in progress is not a model
    return repo


@pytest.fixture(scope="module")
def server(fake_repo: Path) -> Iterator[LiveServer]:
    settings = Settings(repository=fake_repo, default_model="fake", max_body_mb=1, threads=1, decode_workers=2)
    with live_server(settings) as srv:
        yield srv


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    return encode(photo())

