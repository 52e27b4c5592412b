"""The package installs under names of its own: app/ as effnet_serve, build/ as effnet_build (pyproject.toml),
so that it never shadows another distribution's top-level package, PyPA's `build` above all."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"app": "effnet_serve", "build": "effnet_build"}


def test_every_package_folder_is_installed_under_its_name():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    on_disk = {
        ".".join([FOLDERS[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
        for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py") if "__pycache__" not in init.parts
    }
    assert set(config["packages"]) == on_disk  # a new sub-package must be listed, or the wheel lacks it


def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # Without the PYTHONPATH tests/conftest.py sets: the fresh venv must see only what is installed in it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_the_wheel_installs_beside_pypa_build_and_both_work(tmp_path):
    """In a fresh venv: PyPA's `build`, then this project's wheel; `python -m build` and `effnet build` both
    still work. The project's dependencies (torch for the build step) come from the test's own environment
    through a .pth line, after the venv's own packages."""
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), str(ROOT))
    wheel = next((tmp_path / "dist").glob("effnet_serve-*.whl"))
    # The page at / and /docs are package data (pyproject's package-data): every file of app/api/static ships.
    static = {f"effnet_serve/api/static/{f.name}" for f in (ROOT / "app" / "api" / "static").iterdir()}
    assert static and static <= set(zipfile.ZipFile(wheel).namelist()), static - set(zipfile.ZipFile(wheel).namelist())
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    _run(str(py), "-m", "pip", "install", "--quiet", "build")
    _run(str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel))
    site = Path(_run(str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    theirs = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_test_dependencies.pth").write_text("\n".join(theirs) + "\n")
    assert "build" in _run(str(py), "-m", "build", "--version", cwd=tmp_path).stdout
    where = _run(str(py), "-c", "import build, effnet_build, effnet_serve; print(build.__file__, effnet_build.__file__)",
                 cwd=tmp_path).stdout.split()
    assert where[0] == str(site / "build" / "__init__.py"), where  # PyPA's, not ours
    assert where[1] == str(site / "effnet_build" / "__init__.py"), where
    assert "--weights" in _run(str(env_dir / "bin" / "effnet"), "build", "--help", cwd=tmp_path).stdout
