"""Smoke test of the benchmark (`python -m benchmarks.run --quick`): the real pipeline (raw ORT, the
service, its peers, perf_analyzer, the records and the report) end to end on tiny models with ~1 s windows. No timing is
asserted: the benchmark is not a test of speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.records import (Bench, Bursts, ClosedLoop, LoadWindow, MemoryBurst, Probes, Results, Run, Server, Soak,
                                append, latest, of)
from benchmarks.report import models_json
from benchmarks.targets import targets

ROOT = Path(__file__).resolve().parents[2]

SECTIONS = [
    "## Targets (issue 14)",
    "## 1. Raw ONNX Runtime: the ceiling (default session) and the server's session",
    "## 2. The service",
    "### CPU time per image by stage (target 5)",
    "## 3. Peers",
    "## 4. perf_analyzer beside the load generator",
    "## 5. Memory",
    "## 6. Throughput and p95 latency vs MACs",
    "## GPU: unmeasured",
]
MANUAL = "<!-- manual -->\n## Build time\n\nkept by hand\n<!-- /manual -->"
MAIN_KINDS = {"Run", "Model", "OrtTiming", "BatchTable", "LoadWindow", "Server", "ServiceMemory", "PerfRow"}


def soak_run(out: Path) -> None:
    """Another benchmark's run in the same benchmarks.jsonl: its section is rendered beside the main run's."""
    append(out / "benchmarks.jsonl", "soak", [Bench("soak", "python -m benchmarks.memory --soak", "2026-12-05", {}),
                                              Soak(["b0"], ["b0"], 10.0, 16, 8144, 0, 1_435_620, 1_483_412)])


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmarks.md").write_text(f"# old report\n\n{MANUAL}\n\nold tail\n")
    soak_run(out)
    docs_before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "docs").glob("benchmarks*")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ["PYTHONPATH"]]))  # conftest: the checkout's app
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]

    md = (out / "benchmarks.md").read_text()
    for section in SECTIONS:
        assert section in md, f"missing section {section!r}"
    assert "Not run." not in md
    assert "`python -m benchmarks.run --quick --out " in md, "the command that produced the doc is missing"
    assert MANUAL in md, "the manual section was not kept"
    assert "## Memory over a long burst (`make bench-soak`)" in md and "8,144 answers" in md, "another benchmark's run"
    assert "old tail" not in md
    assert "![throughput and p95 latency vs MACs](benchmarks.png)" in md
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "[benchmarks-history.md](benchmarks-history.md)" in md

    res = Results(latest(out / "benchmarks.jsonl"))
    assert {type(r).__name__ for r in res.records} == MAIN_KINDS, "a kind of record is missing"
    assert isinstance(res.run, Run)
    # The ceiling: raw ORT's default session at batch 1 and 8 for every matrix model.
    for name in res.run.full:
        assert res.ort("raw", name, "default", 1) and res.ort("raw", name, "default", 8), name
    checks = targets(res)
    assert {c.status for c in checks} <= {"met", "missed", "unmeasured", "reported"}
    measured = {c.goal[:3] for c in checks if c.status != "unmeasured"}
    assert {"(1)", "(2)", "(3)", "(4)", "(5)"} <= measured, checks
    windows = res.of(LoadWindow)
    assert {w.server for w in windows} == {"service", "litserve", "fastapi"}
    assert all(w.ok > 0 for w in windows), "a server answered nothing in some window"
    # Per-stage CPU over every process of the service (the default splits it into worker processes): the front end's
    # event loop and ORT both did work in every window.
    for w in (w for w in windows if w.server == "service"):
        assert w.stage_cpu_ms["event loop"] > 0 and w.stage_cpu_ms["ORT workers"] + w.stage_cpu_ms["inference threads"] > 0, w
    assert all(not s.note and s.ready_s for s in res.of(Server)), res.of(Server)
    # The per-model summary `effnet report --bench` reads.
    from effnet_serve.tools.report import read_bench

    (tmp_path / "models.json").write_text(json.dumps(models_json(res)))
    assert set(read_bench(tmp_path / "models.json")["models"]) == set(res.run.models)
    # The quick run never touches docs/.
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "docs").glob("benchmarks*")} == docs_before


def test_batch_table_merges(tmp_path: Path) -> None:
    from benchmarks.raw_ort import write_batch_sizes

    (tmp_path / "batch_sizes.json").write_text(json.dumps({"b4": 1, "cuda": {"b0": 32}}))
    assert write_batch_sizes(tmp_path, "cpu", {"b0": 4}).written == {"b0": 4}
    assert json.loads((tmp_path / "batch_sizes.json").read_text()) == {"cpu": {"b4": 1, "b0": 4}, "cuda": {"b0": 32}}

    from effnet_serve.core.config import read_batch_table

    assert read_batch_table(tmp_path, "cpu") == {"b0": 4, "b4": 1}
    assert read_batch_table(tmp_path, "cuda") == {"b0": 32}


def test_reliability_bench_quick_run_writes_its_records_and_section(tmp_path: Path) -> None:
    """`python -m benchmarks.reliability --quick`: every scenario on the tiny model, its records appended next to what
    benchmarks.jsonl already holds and its section rendered with the others', never into docs/."""
    (tmp_path / "benchmarks.md").write_text(f"# report\n\n{MANUAL}\n")
    soak_run(tmp_path)
    docs_before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "docs").glob("benchmarks*")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ["PYTHONPATH"]]))  # conftest: the checkout's app
    r = subprocess.run([sys.executable, "-m", "benchmarks.reliability", "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    md = (tmp_path / "benchmarks.md").read_text()
    assert MANUAL in md and "## Memory over a long burst" in md
    assert md.index("## Reliability scenarios") < md.index("<!-- manual -->")
    assert f"`python -m benchmarks.reliability --quick --out {tmp_path}`" in md and "Quick (smoke) run" in md
    recs = latest(tmp_path / "benchmarks.jsonl", "reliability")
    assert {c.window for c in of(recs, ClosedLoop)} == {"before", "storm", "after"} and of(recs, ClosedLoop)[1].ok > 0
    assert of(recs, Bursts)[0].accepted > 0 and all(p.n > 0 for p in of(recs, Probes)) and len(of(recs, Probes)) == 6
    # quick: one request per memory-burst client, every one answered 200 in the end
    assert of(recs, MemoryBurst)[0].final == {"big": {"200": 16}, "bomb": {"200": 4}, "parts": {"200": 2}}, recs
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "docs").glob("benchmarks*")} == docs_before
