"""Triton's perf_analyzer against the service (`make perf-analyzer` installs it into .cache/perf-analyzer).

It sends preprocessed FP32 tensors (random data, binary tensor format) to /v2/models/<m>/infer, or over
gRPC, and measures until three windows agree: a different load than the project's load generator,
which uploads JPEGs to /classify (decode and preprocessing are part of what it measures).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
from pathlib import Path

from benchmarks.harness import ROOT

PA_DIR = ROOT / ".cache" / "perf-analyzer"


def binary() -> Path | None:
    b = PA_DIR / "bin" / "perf_analyzer"
    return b if b.is_file() and os.access(b, os.X_OK) else None


def run(target: str, model: str, protocol: str, batch: int, concurrency: int, interval_ms: int, max_trials: int,
        csv_path: Path, timeout: float, stability_pct: int = 25) -> dict:
    """One perf_analyzer run at one concurrency. target: host:port. -> parsed numbers, or the failure."""
    exe = binary()
    if exe is None:
        return {"protocol": protocol, "status": "not run: perf_analyzer not installed (make perf-analyzer)"}
    cmd = [str(exe), "-m", model, "-i", protocol, "-u", target, "-b", str(batch),
           "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
           "--max-trials", str(max_trials), "--stability-percentage", str(stability_pct), "-f", str(csv_path)]
    if protocol == "http":
        cmd += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
    cudart = PA_DIR / "nvidia" / "cuda_runtime" / "lib"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"protocol": protocol, "status": f"failed: no answer within {timeout:.0f} s", "command": _cmd(cmd)}
    out = p.stdout + p.stderr
    result: dict = {"protocol": protocol, "batch": batch, "concurrency": concurrency, "rc": p.returncode,
                    "command": _cmd(cmd), "interval_ms": interval_ms, "max_trials": max_trials, "stability_pct": stability_pct,
                    "stable": "Failed to obtain stable measurement" not in out}
    row = _csv_row(csv_path)
    m = re.search(r"Throughput:\s*([\d.]+)\s*infer/sec", out)
    if row:
        result.update(img_per_s=float(row["Inferences/Second"]),
                      **{f"p{q}_ms": int(row[f"p{q} latency"]) / 1000.0 for q in (50, 90, 95, 99) if row.get(f"p{q} latency")})
    elif m:
        result["img_per_s"] = float(m.group(1))
    result["status"] = "ok" if result.get("img_per_s") else "failed"
    if result["status"] != "ok" or p.returncode != 0:
        result["output_tail"] = out[-1500:]
    return result


def run_stable(*args, stabilities: tuple[int, ...] = (25, 60), **kw) -> dict:
    """run(), once more with a looser stability criterion when the windows did not agree (a shared 2-core box)."""
    for pct in stabilities:
        r = run(*args, stability_pct=pct, **kw)
        if r["status"] == "ok" or r.get("stable", True):
            break
    return r


def _csv_row(path: Path) -> dict | None:
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except OSError:
        return None
    return rows[-1] if rows and rows[-1].get("Inferences/Second") else None  # one row per concurrency


def _cmd(cmd: list[str]) -> str:
    return " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
