"""The page at / and /docs: servers on a repository of Lite0 (real weights) beside `tiny` (random weights),
and, for the browser tests, Debian's Chromium driven by Playwright (never `playwright install`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prerequisites import missing, require_module
from serving_helpers import link_repo

CHROMIUM = Path("/usr/bin/chromium")
# Known to work as root in a closed network: no sandbox, and none of Chromium's own calls home (without the
# background-networking flags it opens connections that the network refuses, and a test would see them).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def ui_repo(lite0_repo: Path, tiny_repo: Path, tmp_path_factory) -> Path:
    return link_repo(tmp_path_factory.mktemp("ui"), lite0_repo / "lite0", tiny_repo / "tiny")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per module; each test opens a fresh context (no storage shared between them)."""
    sync_api = require_module("playwright.sync_api", "pip install -e '.[test]'")
    if not CHROMIUM.exists():
        missing("Debian's chromium", "make system-deps (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
