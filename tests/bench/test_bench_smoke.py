"""Smoke test of the benchmark (`python -m benchmarks.run --quick`): it runs end to end and writes a
report with every section. No timing is asserted: the benchmark is not a test of speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SECTIONS = [
    "## Targets (issue 5)",
    "## 1. Raw ONNX Runtime",
    "## 2. The service",
    "## 3. The naive baseline",
    "## 4. Preprocessing alone",
    "## 5. Memory",
    "## 6. Throughput and p95 latency vs MACs",
    "## GPU: unmeasured (no GPU lent to this session)",
]
MANUAL = "<!-- manual -->\n## Build time\n\nkept by hand\n<!-- /manual -->"


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmarks.md").write_text(f"# old report\n\n{MANUAL}\n\nold tail\n")
    docs_before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "docs").glob("benchmarks*")}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]

    md = (out / "benchmarks.md").read_text()
    for section in SECTIONS:
        assert section in md, f"missing section {section!r}"
    assert "Not run." not in md
    assert MANUAL in md, "the manual section was not preserved"
    assert "old tail" not in md
    assert "![throughput and p95 latency vs MACs](benchmarks.png)" in md
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((out / "benchmarks.json").read_text())
    for key in ("meta", "raw", "batch_sizes", "prep", "service", "naive", "memory", "targets", "models"):
        assert key in data, f"missing {key!r} in benchmarks.json"
    assert {t["status"] for t in data["targets"]} <= {"met", "missed", "unmeasured"}
    for name, entry in data["models"].items():
        assert {"p50_ms", "p95_ms", "img_per_s"} <= set(entry), name
    assert all(r["ok"] > 0 for r in data["service"]), "the service answered nothing in some cell"
    # The quick run never touches docs/.
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "docs").glob("benchmarks*")} == docs_before


def test_batch_table_merges(tmp_path: Path) -> None:
    from benchmarks.run import write_batch_sizes

    (tmp_path / "batch_sizes.json").write_text(json.dumps({"b4": 1, "cuda": {"b0": 32}}))
    raw = {"b0": {"device": "cpu"}}
    write_batch_sizes(tmp_path, raw, {"b0": 4})
    assert json.loads((tmp_path / "batch_sizes.json").read_text()) == {"cpu": {"b4": 1, "b0": 4}, "cuda": {"b0": 32}}

    from app.core.config import read_batch_table

    assert read_batch_table(tmp_path, "cpu") == {"b0": 4, "b4": 1}
    assert read_batch_table(tmp_path, "cuda") == {"b0": 32}
