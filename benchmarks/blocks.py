"""What the `make bench-*` scripts share: their command line (records appended to docs/benchmarks.jsonl, the report
rendered from them), the machine they ran on, and contenders (a service, a LitServe peer, the same work without a
server) measured in alternating blocks, each frozen (SIGSTOP) while another runs."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import perf_analyzer as pa
from benchmarks.harness import (DOCS, MULTIPART_TYPE, ROOT, Process, cpu_busy_s, free_port, loadgen, log, own_cpu_s,
                                python_env, write_photo)

GIB = 1024 * 1024  # KiB per GiB


def block_main(name: str, run: Callable[[argparse.Namespace], list], window_s: float = 5.0, rounds: int = 2,
               options: Callable[[argparse.ArgumentParser], Any] | None = None, argv: list[str] | None = None) -> int:
    """The command line of `make bench-NAME`: a run whose records (a Bench, then what `run` returns; `run` may fill
    plan.settings and rename plan.bench) are appended to <out>/benchmarks.jsonl, and <out>/benchmarks.md rendered from them
    (benchmarks.report); --quick: a smoke run into --out or a temp dir, never docs/; --render: only the rendering."""
    from benchmarks import report
    from benchmarks.records import Bench, append

    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny models, short windows; never into docs/")
    p.add_argument("--out", type=Path, default=None, help="folder of benchmarks.jsonl and .md (default docs/; --quick: a temp dir)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--window", type=float, default=None)
    p.add_argument("--render", action="store_true", help="only render benchmarks.md again from benchmarks.jsonl")
    if options:
        options(p)
    argv = sys.argv[1:] if argv is None else argv
    plan = p.parse_args(argv)
    if plan.render:
        print(*report.render(plan.out or DOCS))
        return 0
    out = plan.out or (Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) if plan.quick else DOCS)
    if plan.quick and out.resolve() == DOCS.resolve():
        raise SystemExit("--quick never writes to docs/: its numbers are meaningless")
    plan.command = " ".join([f"python -m benchmarks.{name}", *argv])
    plan.rounds = plan.rounds or (1 if plan.quick else rounds)
    plan.window = plan.window or (2.0 if plan.quick else window_s)
    plan.warmup = 0.5 if plan.quick else 1.0
    plan.settings, plan.bench = {}, name
    t0, busy0, own0 = time.perf_counter(), cpu_busy_s(), own_cpu_s()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        plan.work = Path(tmp)
        records = run(plan)
    seconds = time.perf_counter() - t0
    bench = Bench(name=plan.bench, command=plan.command, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine_info(),
                  seconds=round(seconds, 1), quick=plan.quick, label=getattr(plan, "label", ""), settings=plan.settings,
                  others_cpu_pct=round(max(0.0, 100.0 * ((cpu_busy_s() - busy0) - (own_cpu_s() - own0)) / seconds), 1))
    out.mkdir(parents=True, exist_ok=True)
    append(out / "benchmarks.jsonl", f"{bench.key} {bench.date} {os.getpid()}", [bench, *records])
    paths = report.render(out)
    print(report.section([bench, *records]))
    log(f"{plan.bench} took {seconds:.0f} s; wrote {', '.join(map(str, paths))}")
    return 0


def machine_info() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or "unknown"
    try:
        info["cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores"] = os.cpu_count()
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
        info["isa"] = ", ".join(n for f, n in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
                                              ("avx_vnni", "AVX-VNNI"), ("amx_tile", "AMX")) if f in flags) or "no AVX2"
    except (OSError, AttributeError):
        pass
    try:
        mem = Path("/proc/meminfo").read_text()
        info["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", mem).group(1)) / GIB, 1)
    except (OSError, AttributeError):
        pass
    versions = {}
    for pkg in ("onnxruntime", "numpy", "pillow", "torch", "fastapi", "uvicorn", "starlette", "onnx"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    for pkg in ("uvloop", "httptools"):  # uvicorn's fast paths; without them it runs asyncio + h11
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    info["versions"] = versions
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        info["git"] = rev.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    import onnxruntime

    info["ort_providers"] = onnxruntime.get_available_providers()
    env = {k: v for k, v in os.environ.items() if k.startswith("EFFNET_")}
    if env:
        info["effnet_env"] = env
    return info


# --- contenders in alternating blocks ------------------------------------------------------------------------
PEERS_DIR = ROOT / "benchmarks" / "peers"
SERVERLESS = "serverless"


def cores() -> int:
    return len(os.sched_getaffinity(0))


class Contender:
    """One server (a process group) or the serverless pipeline (a process per window)."""

    def __init__(self, name: str, proc: Process | None = None, grpc_port: int | None = None) -> None:
        self.name, self.proc, self.grpc_port = name, proc, grpc_port

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.proc.stop()


def start_service(work: Path, repo: Path, models: str, workers: int, extra: dict[str, str] | None = None,
                  name: str = "", ready_s: float = 300, tree: Path | None = None) -> Contender:
    """`effnet serve` on `models` (comma list; the first is the default) with `workers` front ends; nothing of the
    caller's EFFNET_* inherited. tree: the checkout of an older commit to run instead (it imports as `app`)."""
    env = {k: v for k, v in python_env().items() if not k.startswith("EFFNET_")}
    grpc = free_port()
    env.update({"EFFNET_REPOSITORY": str(repo), "EFFNET_MODELS": models, "EFFNET_DEFAULT_MODEL": models.split(",")[0],
                "EFFNET_WORKERS": str(workers), "EFFNET_GRPC_PORT": str(grpc), **(extra or {})})  # extra wins
    port = free_port()
    name = name or f"service, {workers} worker" + ("s" if workers > 1 else "")
    boot = ["-m", "effnet_serve"]
    if tree:
        env["PYTHONPATH"] = str(tree)
        boot = ["-c", f"import sys; sys.path.insert(0, {str(tree)!r}); from app.cli import main; sys.exit(main())"]
    proc = Process(name, [sys.executable, *boot, "serve", "--host", "127.0.0.1", "--port", str(port)], env, port,
                   work / f"{re.sub(r'[^a-z0-9]+', '-', name.lower())}-{workers}.log")
    if ready_s:
        proc.wait_ready(ready_s)
    return Contender(name, proc, grpc)


def start_litserve(work: Path, repo: Path, model: str, workers: int) -> Contender:
    port = free_port()
    proc = Process(f"LitServe, {workers}", [sys.executable, str(PEERS_DIR / "litserve_server.py"), "--model-dir",
                                            str(repo / model), "--port", str(port), "--workers", str(workers)],
                   python_env(), port, work / f"litserve-{model}-{workers}.log", ready_path="/health",
                   stop_signal=signal.SIGINT)
    proc.wait_ready(120)
    return Contender(f"LitServe, {workers} worker" + ("s" if workers > 1 else ""), proc)


def jpeg(work: Path, image: str) -> tuple[Path, Path]:
    """The JPEG of a case ("NNpx": a centre square of scikit-image's chelsea at that size; "photo": 1920x1080), and
    the same JPEG as the multipart body the peers take."""
    from PIL import Image
    from skimage import data as skdata

    from benchmarks.peers.payloads import multipart_body

    if image == "photo":
        path = write_photo(work / "photo-1920x1080.jpg")
    else:
        size, src = int(image.removesuffix("px")), Image.fromarray(skdata.chelsea())
        w, h = src.size
        s = min(w, h)
        path = work / f"chelsea-{size}px.jpg"
        src.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.Resampling.LANCZOS).save(
            path, quality=90)
    data, ctype = multipart_body(path.read_bytes())
    assert ctype == MULTIPART_TYPE
    (body := path.with_suffix(".multipart")).write_bytes(data)
    return path, body


def window(c: Contender, model: str, repo: Path, case: str, clients: int, image: Path, body: Path, plan,
           latency: bool = False) -> dict:
    """One window of a contender: {"img_per_s", "p50_ms", "p99_ms", "cores"} (cores: the CPU its process group kept busy,
    HTTP windows of servers only). case "grpc ...": the service's gRPC tensors by
    perf_analyzer (batch 1, `clients` in flight); else HTTP JPEGs by the load generator (the service gets the raw
    body, LitServe the multipart one). The serverless pipeline: its throughput, or with `latency`, one request of
    `clients` images at a time (gRPC: the tensors ready)."""
    keys = ("img_per_s", "p50_ms", "p99_ms")
    if c.name == SERVERLESS:
        cmd = [sys.executable, "-m", "benchmarks.serverless", "--model-dir", str(repo / model), "--image", str(image),
               "--duration", str(plan.window)]
        cmd += ["--latency", str(clients)] + ["--tensors"] * case.startswith("grpc") if latency else []
        r = subprocess.run(cmd, env=python_env(), cwd=ROOT, capture_output=True, text=True, timeout=plan.window + 120)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        out = json.loads(r.stdout)
    elif case.startswith("grpc"):
        out = pa.run(f"127.0.0.1:{c.grpc_port}", model, "grpc", 1, clients, int(plan.window * 1000), 3,
                     plan.work / "pa.csv", timeout=plan.window * 4 + 60, stability_pct=60)
    else:
        service = c.name.startswith("service")
        out = loadgen(c.proc.base + (f"/classify?model={model}" if service else "/predict"), image if service else body,
                      clients, plan.window, plan.warmup, 5.0, content_type="image/jpeg" if service else MULTIPART_TYPE,
                      server_pgid=c.proc.pid)
        if out.get("server_cpu_pct") is not None:
            out["cores"] = round(out["server_cpu_pct"] / 100.0, 2)
    return {k: out.get(k) for k in (*keys, "cores")}


def alternating(contenders: list[Contender], rounds: int, one: Callable[[Contender], Any], label: str) -> dict[str, list]:
    """`one(c)` for each contender in turn, `rounds` times, every other contender frozen (SIGSTOP) meanwhile:
    one after the other instead, the machine's drift alone moves ratios by ±15% here."""
    rows: dict[str, list] = {}
    for c in contenders:
        c.signal(signal.SIGSTOP)
    try:
        for rnd in range(rounds):
            for c in contenders:
                c.signal(signal.SIGCONT)
                time.sleep(0.3)
                try:
                    value = one(c)
                finally:
                    c.signal(signal.SIGSTOP)
                rows.setdefault(c.name, []).append(value)
                log(f"{label} round {rnd + 1}: {c.name}: {value}")
    finally:
        for c in contenders:
            c.signal(signal.SIGCONT)
    return rows


def median_of(windows: list[dict], key: str) -> float | None:
    values = [w[key] for w in windows if w.get(key) is not None]
    return round(statistics.median(values), 2) if values else None
