"""Reliability campaigns: fixtures and the JSON report hook.

The tests reuse the serving tests' helpers (fake ONNX models, the in-process live server,
the hostile-image generators), which tests/conftest.py puts on sys.path.
"""

from __future__ import annotations

import os

import pytest

from reliability_helpers import write_report_json


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("EFFNET_RELIABILITY_REPORT")
    if path:
        write_report_json(path, exitstatus)
