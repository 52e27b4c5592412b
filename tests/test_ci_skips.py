"""The CI rule of tests/prerequisites.py, on a throwaway suite run by a real pytest: a skip for a
missing tool or package fails under CI=true and stays a skip elsewhere; other skips stay skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

PROBE = '''
import pytest
from prerequisites import missing, require_module, require_tool


@pytest.fixture
def needs_a_tool():
    return require_tool("no-such-tool-for-effnet", "nothing")


def test_missing_tool():
    require_tool("no-such-tool-for-effnet", "nothing")


def test_missing_tool_in_a_fixture(needs_a_tool):
    pass


def test_missing_module():
    require_module("no_such_module_for_effnet", "nothing")


def test_missing_data():
    missing("a package's sample photos", "nothing")


def test_bare_importorskip():
    pytest.importorskip("no_such_module_for_effnet")


def test_a_tool_that_is_there():
    assert require_tool("python", "nothing") or require_tool("python3", "nothing")


def test_not_applicable_here():
    pytest.skip("only on big-endian machines")


@pytest.mark.skipif(True, reason="a condition")
def test_conditional_marker():
    pass
'''

CONFTEST = f'''
import json
import sys

sys.path.insert(0, {str(TESTS)!r})
from prerequisites import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

OUTCOMES = {{}}


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        OUTCOMES[report.nodeid.split("::")[-1]] = report.outcome


def pytest_sessionfinish(session):
    with open("outcomes.json", "w") as f:
        json.dump(OUTCOMES, f)
'''


def run_probe(tmp_path: Path, ci: str | None) -> dict[str, str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "test_probe.py"],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return json.loads((tmp_path / "outcomes.json").read_text())


MISSING = ["test_missing_tool", "test_missing_tool_in_a_fixture", "test_missing_module", "test_missing_data",
           "test_bare_importorskip"]
LEGITIMATE = ["test_not_applicable_here", "test_conditional_marker"]


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_a_missing_tool_is_a_skip(tmp_path, ci):
    outcomes = run_probe(tmp_path, ci)
    assert {name: outcomes[name] for name in MISSING + LEGITIMATE} == dict.fromkeys(MISSING + LEGITIMATE, "skipped")
    assert outcomes["test_a_tool_that_is_there"] == "passed"


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_a_missing_tool_fails_and_a_conditional_skip_stays_a_skip(tmp_path, ci):
    outcomes = run_probe(tmp_path, ci)
    assert {name: outcomes[name] for name in MISSING} == dict.fromkeys(MISSING, "failed")
    assert {name: outcomes[name] for name in LEGITIMATE} == dict.fromkeys(LEGITIMATE, "skipped")
    assert outcomes["test_a_tool_that_is_there"] == "passed"
