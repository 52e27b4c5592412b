"""Triton's own load generator, perf_analyzer, talks to the service unchanged: model metadata, the model
configuration extension and binary tensors over HTTP, and the same over gRPC, the way every Triton user
measures a server.

Compatibility, not speed: perf_analyzer runs in count windows (each closes after WINDOW_REQUESTS answers,
however long that takes) with a stability criterion no three windows can miss, so its exit status says
whether it could talk to the service, never how steady the machine was. Its throughput is measured by
`make bench`; whether it finds a stable window under its usual criteria was measured once
(docs/benchmarks-history.md, 2026-12-05).

The binary comes from the tritonclient 2.41.1 wheel, installed apart by `make perf-analyzer` (the Makefile
says why); it needs Debian's libb64-0d and libcudart from nvidia-cuda-runtime-cu12, even without a GPU.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import httpx
from prerequisites import require_tool
from serving_helpers import live_server

from effnet_serve.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PA_DIR = ROOT / ".cache" / "perf-analyzer"


WINDOW_REQUESTS = 20
TRIALS = 3  # perf_analyzer compares the last three windows, so it needs three
# "Stable" means max/min of the three windows' throughput and latency within this percentage: 10000%
# accepts any three windows that each got their answers, which count windows guarantee.
COUNT_ONLY = ["--measurement-mode", "count_windows", "--measurement-request-count", str(WINDOW_REQUESTS),
              "--max-trials", str(TRIALS), "--stability-percentage", "10000"]


def served(metrics: str) -> dict[str, float]:
    """effnet_requests_total of model tiny, by status."""
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^effnet_requests_total\{model="tiny",status="(\d+)"\} (\S+)$', metrics, re.M)}


def perf_analyzer() -> tuple[str, dict[str, str]]:
    binary = require_tool("perf_analyzer", "make perf-analyzer", str(PA_DIR / "bin" / "perf_analyzer"))
    cudart = PA_DIR / "nvidia" / "cuda_runtime" / "lib"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    return binary, env


def test_perf_analyzer_measures_the_service_over_http_with_binary_tensors(tiny_family_repo):
    binary, env = perf_analyzer()
    settings = Settings(repository=tiny_family_repo, models=["tiny"], threads=1, grpc_port=0)
    with live_server(settings) as srv:
        proc = subprocess.run(
            [binary, "-m", "tiny", "-i", "http", "-u", srv.url.removeprefix("http://"), "-b", "2",
             "--concurrency-range", "2", *COUNT_ONLY, "--input-tensor-format", "binary", "--output-tensor-format", "binary"],
            capture_output=True, text=True, timeout=300, env=env,
        )
        metrics = httpx.get(srv.url + "/metrics").text
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Throughput:" in out and "infer/sec" in out
    # Every request it sent was answered 200: at least its three windows' worth, and nothing else.
    counts = served(metrics)
    assert set(counts) == {"200"} and counts["200"] >= TRIALS * WINDOW_REQUESTS, counts


def test_perf_analyzer_measures_the_service_over_grpc(tiny_family_repo):
    binary, env = perf_analyzer()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        grpc_port = s.getsockname()[1]
    settings = Settings(repository=tiny_family_repo, models=["tiny"], threads=1, grpc_port=grpc_port)
    with live_server(settings) as srv:
        proc = subprocess.run(
            [binary, "-m", "tiny", "-i", "grpc", "-u", f"127.0.0.1:{grpc_port}", "-b", "2",
             "--concurrency-range", "2", *COUNT_ONLY],
            capture_output=True, text=True, timeout=300, env=env,
        )
        metrics = httpx.get(srv.url + "/metrics").text
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Throughput:" in out
    counts = served(metrics)
    assert set(counts) == {"200"} and counts["200"] >= TRIALS * WINDOW_REQUESTS, counts
