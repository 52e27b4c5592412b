"""Smoke test of `make bench-scaling` (`python -m benchmarks.scaling --quick`): the tiny model through 1 and N
real worker processes, both LitServe peers and the serverless pipeline, in frozen alternating blocks, and its
block of benchmarks.md. No speed is asserted; every contender must have answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_scaling_run_measures_every_contender_and_writes_its_block(tmp_path: Path) -> None:
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n<!-- manual -->\nkept\n<!-- /manual -->\n")
    r = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--quick", "--window", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "benchmarks-scaling.json").read_text())
    http = next(c for c in result["cases"] if c["case"] == "tiny http")
    many = f"service, {result['workers']} workers"
    assert set(http["img_per_s"]) == {"service, 1 worker", many, "LitServe, 1 worker", "LitServe, 2 workers", "serverless"}
    assert all(v > 0 for v in http["img_per_s"].values()), http
    grpc = next(c for c in result["cases"] if c["case"] == "tiny grpc")
    assert all(v > 0 for v in grpc["img_per_s"].values()), grpc
    md = (tmp_path / "benchmarks.md").read_text()
    assert md.count("<!-- scaling -->") == 1 and "kept" in md and "| tiny http (80px) | 64 |" in md
    assert "(goal ≥ 1.7×)" in md
