"""Fixtures for the evaluation tests: the photo set in every layout, and writable model copies.

The models come from tests/conftest.py (`lite0_repo`: real ImageNet weights; `tiny_repo`:
random weights); tests copy them (`copy_repo`) before `effnet eval` writes into a manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_photos import available, write_set
from prerequisites import missing

LAYOUTS = ("folder", "csv", "valtxt", "loc", "ilsvrc")


@pytest.fixture(scope="session")
def photos():
    found = available()
    if len(found) < 3:
        missing("scikit-image's sample photos", "scikit-image (test extra)")
    return found


@pytest.fixture(scope="session")
def photo_sets(tmp_path_factory, photos) -> dict[str, Path]:
    """layout -> folder holding the photo set in that layout."""
    root = tmp_path_factory.mktemp("photos")
    for layout in LAYOUTS:
        write_set(root / layout, layout, photos)
    return {layout: root / layout for layout in LAYOUTS}


@pytest.fixture
def run_eval(capsys):
    """`effnet eval ... --json --quiet`: (exit code, parsed JSON or None, stderr)."""
    from effnet_serve.tools.eval_cli import main

    def _run(*args: str) -> tuple[int, dict | None, str]:
        capsys.readouterr()
        rc = main(["eval", *map(str, args), "--json", "--quiet"])
        out, err = capsys.readouterr()
        return rc, (json.loads(out) if out.strip() else None), err

    return _run
