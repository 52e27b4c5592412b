"""The peers phase: the servers the service is measured against, each alone on the machine, same load generator, same
JPEG bytes. benchmarks/peers/: LitServe (dynamic batching 8), the hand-written FastAPI + ORT server (no batching),
PyTriton (Triton's dynamic batcher; only when its venv could be set up); the headline model at the top N,
model-resolution JPEGs and 1920x1080 photos. CPU is the whole process group's."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import MULTIPART_TYPE, ROOT, Process, free_port, loadgen, log, memory_kib, python_env
from benchmarks.peers.payloads import v2_binary_body
from benchmarks.records import LoadWindow, Record, Server

PEERS_DIR = ROOT / "benchmarks" / "peers"
PEER_READY_S = 120  # each starts in seconds; a peer that hangs must not take the run past 10 minutes
PEER_INFO = {
    "litserve": "LitServe 0.2.19: its dynamic batching (max batch 8, 5 ms), one inference worker, plain Pillow, default ORT session",
    "fastapi": "hand-written FastAPI + ORT: `async def` endpoint, batch 1, plain Pillow, default ORT session",
    "pytriton": "PyTriton 0.7.0 (Triton 2.51): its dynamic batcher (max batch 8, 5 ms), plain Pillow and a default ORT session "
                "in the bound Python function; KServe V2 binary request carrying the JPEG",
}


def setup_pytriton() -> tuple[str | None, str]:
    """(python of the PyTriton venv, note); None when setup_pytriton.sh failed (the doc says why)."""
    try:
        r = subprocess.run(["bash", str(PEERS_DIR / "setup_pytriton.sh")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"setup_pytriton.sh did not run: {exc}"
    if r.returncode != 0:
        return None, "setup_pytriton.sh failed: " + (r.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return r.stdout.strip().splitlines()[-1], "venv .cache/peers/pytriton-venv"


def _start(plan, peer: str, model_dir: Path, python: str) -> Process:
    port = free_port(span=3 if peer == "pytriton" else 1)
    script = {"litserve": "litserve_server.py", "fastapi": "fastapi_ort_server.py", "pytriton": "pytriton_server.py"}[peer]
    ready = f"/v2/models/{model_dir.name}/ready" if peer == "pytriton" else "/health"
    return Process(peer, [python, str(PEERS_DIR / script), "--model-dir", str(model_dir), "--port", str(port)],
                   python_env(), port, plan.work / f"{peer}.log", ready_path=ready, stop_signal=signal.SIGINT)


def _bodies(plan, peer: str, inputs: dict[str, Path], name: str) -> dict[str, tuple[str, Path, str, list[str]]]:
    """input kind -> (body kind, body file, Content-Type, extra headers) as this peer takes the same JPEG."""
    out = {}
    for kind, key in (("model-res", name), ("photo", "photo")):
        if peer == "pytriton":
            body, ctype, headers = v2_binary_body(inputs[key].read_bytes(), "images", "predictions")
            path = plan.work / f"{key}.v2"
            path.write_bytes(body)
            out[kind] = ("v2", path, ctype, [f"{k}:{v}" for k, v in headers.items()])
        else:
            out[kind] = ("multipart", inputs[f"{key}:multipart"], MULTIPART_TYPE, [])
    return out


def run_peer(plan, peer: str, inputs: dict[str, Path], python: str = sys.executable) -> list[Record]:
    """Its windows, then its Server record (ready time and memory, or why it failed)."""
    name = plan.full[0]
    n = max(plan.concurrency)
    server = Server(name=peer, what=PEER_INFO[peer])
    out: list[Record] = []
    srv = _start(plan, peer, plan.repo / name, python)
    try:
        log(f"peer {peer}: starting")
        server.ready_s = srv.wait_ready(timeout=PEER_READY_S)
        path = f"/v2/models/{name}/infer" if peer == "pytriton" else "/predict"
        for kind, (body_kind, body, ctype, headers) in _bodies(plan, peer, inputs, name).items():
            r = loadgen(srv.base + path, body, n, plan.load_s, plan.warmup_s, plan.grace_s, content_type=ctype,
                        headers=headers, server_pgid=srv.pid)
            out.append(LoadWindow.of(r, server=peer, model=name, kind=kind, body=body_kind, body_bytes=body.stat().st_size))
            log(f"  {peer} {kind:9} N={n:<3} {r['img_per_s'] or 0:7.1f} img/s  p50 {r['p50_ms'] or 0:7.1f} ms  "
                f"errors {r['errors']}  server CPU {r['server_cpu_pct'] or 0:.0f}%")
        server.rss_kib = memory_kib(srv.pid)["VmRSS"]
    except RuntimeError as exc:
        server.note = str(exc).splitlines()[0][:300]
        log(f"  {peer} failed: {server.note}")
    finally:
        srv.stop()
    return out + [server]


def phase_peers(plan, inputs: dict[str, Path]) -> list[Record]:
    out: list[Record] = []
    for peer in plan.peers:
        if peer != "pytriton":
            out += run_peer(plan, peer, inputs)
        elif plan.pytriton_python is None:
            out.append(Server(name=peer, what=PEER_INFO[peer], note=plan.pytriton_note))
            log(f"peer pytriton skipped: {plan.pytriton_note}")
        else:
            out += run_peer(plan, peer, inputs, plan.pytriton_python)
    return out
