"""What a test needs from the machine (a tool, a package, a package's data), and the rule that CI
never skips for one of them.

Tests call `require_tool`, `require_module` or `missing` instead of a bare `pytest.skip` /
`pytest.importorskip`. On a developer's machine the test is skipped, saying what to install.
Under CI=true the two hooks below (registered by tests/conftest.py) turn such a skip, and any
`pytest.importorskip` skip, into a failure: CI installs everything through the project's own
files, so a missing tool there is a broken install that a green run would hide. A skip for any
other reason (a condition the test does not apply to) stays a skip everywhere.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

MISSING_PREFIX = "missing:"  # every skip reason written here starts with it
IMPORTORSKIP_PREFIX = "could not import"  # pytest.importorskip's reason


def missing(what: str, install: str) -> None:
    """Skip (or, under CI=true, fail: see tests/conftest.py) because `what` is not installed."""
    pytest.skip(f"{MISSING_PREFIX} {what} (install: {install})")


def tool(name: str) -> str | None:
    """A console script of this environment first (the project installs its tools as wheels), then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def require_tool(name: str, install: str, *also: str) -> str:
    """The tool's path; `also` are absolute paths to try after the venv and PATH."""
    found = tool(name) or next((p for p in also if Path(p).exists()), None)
    if found is None:
        missing(f"the {name} tool", install)
    return found


def require_module(name: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python module {name}", install)


# --- the CI rule ------------------------------------------------------------------------------
def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def missing_reason(report) -> str | None:
    """The reason of a skip for something missing, else None (a legitimate conditional skip)."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = report.longrepr[2].removeprefix("Skipped: ")
    return reason if reason.startswith((MISSING_PREFIX, IMPORTORSKIP_PREFIX)) else None


def _fail_in_ci(report) -> None:
    reason = missing_reason(report)
    if reason is not None and in_ci() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"CI=true and {reason}: in CI a missing tool or package fails, it does not skip"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level skip happens while collecting
    _fail_in_ci(outcome.get_result())
