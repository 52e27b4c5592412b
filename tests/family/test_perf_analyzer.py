"""Triton's own load generator, perf_analyzer, measures the service unchanged: model metadata, the model
configuration extension and binary tensors over HTTP, the way every Triton user measures a server.

The binary comes from the tritonclient 2.41.1 wheel, installed apart by `make perf-analyzer` (the Makefile
says why); it needs Debian's libb64-0d and libcudart from nvidia-cuda-runtime-cu12, even without a GPU.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
from prerequisites import require_tool
from serving_helpers import live_server

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PA_DIR = ROOT / ".cache" / "perf-analyzer"


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
             "--concurrency-range", "2", "--measurement-interval", "1000", "--max-trials", "6",
             "--stability-percentage", "60", "--input-tensor-format", "binary", "--output-tensor-format", "binary"],
            capture_output=True, text=True, timeout=120, env=env,
        )
        metrics = httpx.get(srv.url + "/metrics").text
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Throughput:" in out and "infer/sec" in out
    served = [l for l in metrics.splitlines() if l.startswith('effnet_requests_total{model="tiny",status="200"}')]
    assert served and float(served[0].split()[-1]) >= 10


def test_perf_analyzer_measures_the_service_over_grpc(tiny_family_repo):
    binary, env = perf_analyzer()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        grpc_port = s.getsockname()[1]
    settings = Settings(repository=tiny_family_repo, models=["tiny"], threads=1, grpc_port=grpc_port)
    with live_server(settings) as srv:
        proc = subprocess.run(
            [binary, "-m", "tiny", "-i", "grpc", "-u", f"127.0.0.1:{grpc_port}", "-b", "2",
             "--concurrency-range", "2", "--measurement-interval", "1000", "--max-trials", "6",
             "--stability-percentage", "60"],
            capture_output=True, text=True, timeout=120, env=env,
        )
        metrics = httpx.get(srv.url + "/metrics").text
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Throughput:" in out
    assert 'effnet_requests_total{model="tiny",status="200"}' in metrics
