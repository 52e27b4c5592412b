"""Reliability campaigns: fixtures and the JSON report hook.

The tests reuse the serving tests' helpers (fake ONNX models, the in-process live server,
the hostile-image generators), so that folder goes on sys.path like this one does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))

from reliability_helpers import write_report_json


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("EFFNET_RELIABILITY_REPORT")
    if path:
        write_report_json(path, exitstatus)
