"""The Dockerfile's `models` stage copies only part of the source (so a server change does not
rebuild the models). The build must work from exactly that part: this runs `python -m effnet_serve build`
from a folder holding only the files that stage copies, without Docker, in seconds.

`make test-deploy` builds the real image too, but only at the end of CI; an import of a server
module from the build path (which broke the image once) fails here first.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `python -m effnet_serve`, with the checkout's editable install (setuptools' finder) taken off the import path.
PARTIAL = ("import sys; sys.path.insert(0, '.'); "
           "sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, '__module__', '')).startswith('__editable__')]; "
           "from effnet_serve.cli import main; sys.exit(main())")


def models_stage_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY in the `models` stage."""
    copies, in_stage = [], False
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            in_stage = re.search(r"\bAS models\b", line) is not None
        elif in_stage and line.startswith("COPY ") and "--from" not in line:
            *sources, dest = line.split()[1:]
            copies.append((sources, dest))
    return copies


def test_the_models_stage_builds_from_only_what_it_copies(tmp_path):
    copies = models_stage_copies()
    assert copies, "no COPY found in the Dockerfile's models stage"
    src = tmp_path / "src"
    for sources, dest in copies:
        assert dest.startswith("/src/"), dest
        target = src / dest.removeprefix("/src/")
        for s in sources:
            if s.endswith("/"):
                shutil.copytree(ROOT / s, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / s, target / Path(s).name)

    repo = tmp_path / "models"
    args = ["build", "--width", "0.25", "--depth", "0.25", "--resolution", "64", "--name", "stage",
            "--weights", "random", "--repo", str(repo), "--quiet"]
    # As in the image: `effnet_serve` and `effnet_build` are the partial copy (cwd first on sys.path), and no
    # editable install may complete them (its finder resolves any effnet_serve.* by name), so a module the
    # stage does not copy fails here as it would there.
    r = subprocess.run([sys.executable, "-c", PARTIAL, *args], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((repo / "stage" / "manifest.json").read_text())["name"] == "stage"

    # Asking that partial copy for a precision copy fails with a sentence, not a traceback.
    r = subprocess.run([sys.executable, "-c", PARTIAL, *args, "--precision", "fp16", "--check-data", str(tmp_path)],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--precision needs the whole effnet package" in r.stderr
    assert "Traceback" not in r.stderr
