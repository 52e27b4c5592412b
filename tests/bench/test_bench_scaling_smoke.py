"""Smoke test of `make bench-scaling` (`python -m benchmarks.scaling --quick`): the tiny model through 1 and N
real worker processes, both LitServe peers and the serverless pipeline, in frozen alternating blocks: its records appended
to benchmarks.jsonl and its section of benchmarks.md rendered from them. No speed is asserted; every contender must have
answered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.records import Bench, Throughput, latest, of

ROOT = Path(__file__).resolve().parents[2]


def test_quick_scaling_run_measures_every_contender_and_writes_its_block(tmp_path: Path) -> None:
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n<!-- manual -->\nkept\n<!-- /manual -->\n")
    r = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--quick", "--window", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = latest(tmp_path / "benchmarks.jsonl", "scaling")
    (bench,) = of(recs, Bench)
    http = {t.contender: t.img_per_s for t in of(recs, Throughput) if t.case == "tiny http"}
    many = f"service, {bench.settings['workers']} workers"
    assert set(http) == {"service, 1 worker", many, "LitServe, 1 worker", "LitServe, 2 workers", "serverless"}
    assert all(v > 0 for v in http.values()), http
    grpc = [t for t in of(recs, Throughput) if t.case == "tiny grpc"]
    assert len(grpc) == 2 and all(t.img_per_s > 0 for t in grpc), grpc
    md = (tmp_path / "benchmarks.md").read_text()
    assert md.count("## Worker processes: scaling beside the peers") == 1 and "kept" in md and "| tiny http (80px) | 64 |" in md
    assert "tiny http: 2 workers ≥ 1.7× service, 1 worker" in md or bench.settings["workers"] != 2
