"""Fixtures for the family features (Open Inference Protocol, model=auto, cascades).

Models come from the real build step (tests/conftest.py builds `tiny_repo`, `lite0_repo` and
`lite2_repo`). Servers run on repositories of symlinks, so no model is built twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import LiveServer, link_repo, live_server

from effnet_serve.core.config import Settings


@pytest.fixture(scope="session")
def lite_cascade_repo(lite0_repo: Path, lite2_repo: Path, tmp_path_factory) -> Path:
    return link_repo(tmp_path_factory.mktemp("lite02"), lite0_repo / "lite0", lite2_repo / "lite2")


@pytest.fixture(scope="session")
def tiny_family_repo(tiny_repo: Path, tmp_path_factory) -> Path:
    return link_repo(tmp_path_factory.mktemp("tinyfam"), tiny_repo / "tiny", tiny_repo / "tiny2")


@pytest.fixture(scope="module")
def family_server(tiny_family_repo: Path) -> Iterator[LiveServer]:
    """tiny (64 px) and tiny2 (96 px), random weights; `model=cascade` means tiny,tiny2."""
    settings = Settings(
        repository=tiny_family_repo, default_model="tiny", threads=1, decode_workers=2,
        default_cascade=["tiny", "tiny2"], default_budget_ms=1000.0,
    )
    with live_server(settings) as srv:
        yield srv
