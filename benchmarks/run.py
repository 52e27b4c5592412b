"""`python -m benchmarks.run`: raw ONNX Runtime vs the service vs the naive PyTorch server, one run, one machine.

    python -m benchmarks.run                  # full run (make bench) -> docs/benchmarks.{md,json,png}
    python -m benchmarks.run --quick          # smoke mode: tiny models, ~1 s per measurement, temp output
    python -m benchmarks.run --phases raw,prep --models b0   # a partial run while developing

Phases, in order (each writes its own section; one left out by --phases reads "not run"):
  raw      raw ORT img/s and latency per batch size; the best size goes to <repo>/batch_sizes.json
  prep     decode + resize of a 1920x1080 JPEG: plain Pillow vs app.engine.preprocess.prepare
  service  `effnet serve` in a subprocess, the load generator in another, N = 1, 8, 32 clients,
           model-resolution JPEGs and 1920x1080 photos; the server's RSS idle and after the load
  naive    benchmarks/naive_server.py (PyTorch eager, per request) under the same load

Default models: raw ORT for b0..b7 (batch sweep 1, 2, 4, 8 for the matrix models b0, b2, b4;
batch 1 and 2 for the others), service + naive + preprocessing for b0, b2, b4, and all of b0..b7
loaded in the service (the memory target). About 8 minutes on a quiet 2-core machine; the
windows are set by --duration / --naive-duration / --raw-seconds.

Models are built with random weights (same speed as real ones) into a persistent repository
(.cache/bench-repo) the first time; building is not part of the measured run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEFAULT_REPO = ROOT / ".cache" / "bench-repo"
QUICK_CACHE = ROOT / ".cache" / "bench-quick-models"
ALL_B = [f"b{i}" for i in range(8)]
# Smoke mode: small custom variants that build in seconds and run in microseconds.
QUICK_MODELS = {
    "tiny": ["--width", "0.25", "--depth", "0.25", "--resolution", "64"],
    "tiny2": ["--width", "0.35", "--depth", "0.25", "--resolution", "96"],
}
PHASES = ("raw", "prep", "service", "naive")
PHOTO_SIZE = (1920, 1080)
BATCH_SWEEP = [1, 2, 4, 8]


@dataclass
class Plan:
    quick: bool
    repo: Path
    out: Path
    work: Path
    models: list[str]  # raw ORT
    full: list[str]  # full matrix: raw sweep, service, naive, preprocessing
    memory: list[str]  # loaded into the service
    phases: list[str]
    concurrency: list[int]
    raw_s: float
    load_s: float
    warmup_s: float
    naive_s: float
    burst_s: float
    naive_threads: int  # 0 = PyTorch's default
    grace_s: float  # how long the load generator waits for the answers in flight when a window closes
    prep_reps: int
    argv: list[str] = field(default_factory=list)

    def raw_batches(self, model: str) -> list[int]:
        # The full sweep for the matrix models; 1 and 2 for the rest, enough to see whether
        # batching helps at all (on 2 cores it does not for the big ones).
        return BATCH_SWEEP if model in self.full else [1, 2]


# --- small helpers ----------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Process:
    """A server subprocess on a free port, waited for until ready, stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, logfile: Path) -> None:
        self.name, self.port, self.logfile = name, port, logfile
        self._log = logfile.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.base = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                status, _ = http_get(self.base + "/health/ready", timeout=2.0)
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def loadgen(url: str, body: Path, concurrency: int, duration: float, warmup: float, server_pid: int | None,
            grace: float, content_type: str = "image/jpeg") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--body", str(body), "--content-type", content_type,
           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup), "--grace", str(grace)]
    if server_pid:
        cmd += ["--server-pid", str(server_pid)]
    r = subprocess.run(cmd, env=python_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=duration + warmup + grace + 120)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def batch_metrics(base: str) -> dict[str, tuple[float, float]]:
    """model -> (sum, count) of the effnet_batch_size histogram."""
    _, text = http_get(base + "/metrics")
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^effnet_batch_size_(sum|count)\{[^}]*model="([^"]+)"[^}]*\}\s+(\S+)$', text, re.M):
        kind, model, value = m.groups()
        out.setdefault(model, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


# --- models and inputs ------------------------------------------------------------------
def has_model(repo: Path, name: str) -> bool:
    return (repo / name / "manifest.json").is_file() and (repo / name / "model.onnx").is_file()


def build_models(repo: Path, names: list[str], allow_build: bool) -> float:
    missing = [n for n in names if not has_model(repo, n)]
    if not missing:
        return 0.0
    if not allow_build:
        raise SystemExit(f"models missing from {repo}: {', '.join(missing)} (run without --no-build)")
    log(f"building {','.join(missing)} with random weights into {repo} (one-time; not part of the measured run)")
    t0 = time.perf_counter()
    for n in missing:
        args = (QUICK_MODELS[n] + ["--name", n]) if n in QUICK_MODELS else ["--models", n]
        subprocess.run([sys.executable, "-m", "app", "build", *args, "--weights", "random", "--repo", str(repo), "--quiet"],
                       env=python_env(), cwd=ROOT, check=True)
    return time.perf_counter() - t0


def write_photo(path: Path) -> Path:
    """The benchmark's real-case input: a real photo (scikit-image's chelsea) as a 1920x1080 JPEG, quality 90."""
    from PIL import Image
    from skimage import data as skdata

    Image.fromarray(skdata.chelsea()).resize(PHOTO_SIZE, Image.Resampling.LANCZOS).save(path, quality=90)
    return path


def make_inputs(plan: Plan, manifests: dict[str, dict]) -> dict[str, Path]:
    """photo.jpg (1920x1080, quality 90) and <model>-res.jpg (crop x crop) for every matrix model."""
    from PIL import Image
    from skimage import data as skdata

    src = Image.fromarray(skdata.chelsea())
    paths = {"photo": write_photo(plan.work / "photo-1920x1080.jpg")}
    for name in plan.full:
        crop = manifests[name]["preprocess"]["crop"]
        p = plan.work / f"{name}-{crop}px.jpg"
        w, h = src.size  # centre square, then the model's resolution
        s = min(w, h)
        src.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((crop, crop), Image.Resampling.LANCZOS).save(p, quality=90)
        paths[name] = p
    return paths


# --- phases -----------------------------------------------------------------------------
def phase_raw(plan: Plan, results: dict) -> None:
    from benchmarks.raw_ort import best_batch, measure_model

    raw: dict = {}
    best: dict = {}
    for name in plan.models:
        batches = plan.raw_batches(name)
        log(f"raw ORT {name}: batches {batches}")
        raw[name] = r = measure_model(plan.repo / name, batches, plan.raw_s)
        b = best_batch(r)
        r["best_batch"] = b
        # Written only where the measurement brackets the optimum: the full sweep, or a short
        # sweep whose throughput already falls at its largest size.
        r["best_batch_written"] = name in plan.full or b < max(batches)
        if r["best_batch_written"]:
            best[name] = b
        log("  " + ", ".join(f"b{k}: {v['img_per_s']:.1f} img/s" for k, v in r["batches"].items()) + f"; best {b}")
    results["raw"] = raw
    results["batch_sizes"] = write_batch_sizes(plan.repo, raw, best)
    # `make serve` reads models/: the sizes measured here hold for any weights of the same variant.
    served = ROOT / "models"
    if not plan.quick and served.is_dir() and served.resolve() != plan.repo.resolve():
        results["batch_sizes_served"] = write_batch_sizes(served, raw, best)


def write_batch_sizes(repo: Path, raw: dict, best: dict[str, int]) -> dict:
    from app.core.config import BATCH_SIZES_FILE

    device = next((r["device"] for r in raw.values()), "cpu")
    path = repo / BATCH_SIZES_FILE
    data: dict = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    if not isinstance(data, dict):
        data = {}
    # A flat table ({"b0": 8}) is the same as a per-device one for whichever device reads it;
    # keep its entries under the device they were most likely measured on.
    if data and not all(isinstance(v, dict) for v in data.values()):
        data = {device: {k: v for k, v in data.items() if isinstance(v, int)},
                **{k: v for k, v in data.items() if isinstance(v, dict)}}
    data.setdefault(device, {}).update(best)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return {"path": str(path), "device": device, "written": best, "table": data}


def phase_prep(plan: Plan, results: dict, inputs: dict[str, Path]) -> None:
    from app.engine.manifest import load_manifest
    from benchmarks.preprocessing import measure

    data = inputs["photo"].read_bytes()
    prep = {}
    for name in plan.full:
        log(f"preprocessing {name}")
        prep[name] = measure(data, load_manifest(plan.repo / name).preprocess, plan.prep_reps)
    results["prep"] = {"photo_bytes": len(data), "size": list(PHOTO_SIZE), "models": prep}


def _matrix(base_url: str, name: str, inputs: dict[str, Path], plan: Plan, duration: float,
            server_pid: int, metrics: bool, raw_before_one_client: bool = False) -> list[dict]:
    rows = []
    for kind in ("model-res", "photo"):
        body = inputs[name] if kind == "model-res" else inputs["photo"]
        for n in plan.concurrency:
            raw_adjacent = None
            if n == 1 and raw_before_one_client:
                # The 1-client target compares against raw batch-1 latency; this shared VM drifts by
                # 5-10% over minutes, so measure raw again right before the window (the server idles).
                from benchmarks.raw_ort import measure_model

                raw_adjacent = measure_model(plan.repo / name, [1], plan.raw_s)["batches"]["1"]["batch_ms_p50"]
            before = batch_metrics(base_url) if metrics else {}
            r = loadgen(f"{base_url}/classify?model={name}", body, n, duration, plan.warmup_s, server_pid, plan.grace_s)
            if metrics:
                after = batch_metrics(base_url)
                s0, c0 = before.get(name, (0.0, 0.0))
                s1, c1 = after.get(name, (0.0, 0.0))
                r["mean_batch"] = (s1 - s0) / (c1 - c0) if c1 > c0 else None  # includes the warm-up
            r.update(model=name, input=kind, body_bytes=body.stat().st_size, raw_b1_ms_adjacent=raw_adjacent)
            log(f"  {name} {kind:9} N={n:<3} {r['img_per_s'] or 0:7.1f} img/s  p50 {r['p50_ms'] or 0:7.1f} ms  "
                f"p99 {r['p99_ms'] or 0:7.1f} ms  errors {r['errors']}  loadgen CPU {r['loadgen_cpu_pct'] or 0:.0f}%")
            rows.append(r)
    return rows


def phase_service(plan: Plan, results: dict, inputs: dict[str, Path]) -> None:
    loaded = [m for m in plan.memory if has_model(plan.repo, m)]
    port = free_port()
    env = python_env()
    env.update(EFFNET_REPOSITORY=str(plan.repo), EFFNET_MODELS=",".join(loaded), EFFNET_DRAIN_S="2")
    srv = Process("effnet serve", [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
                  env, port, plan.work / "server.log")
    memory: dict = {"models": loaded}
    try:
        log(f"service: loading {','.join(loaded)}")
        memory["ready_s"] = srv.wait_ready(timeout=900)
        _, models_json = http_get(srv.base + "/models")
        try:
            listing = json.loads(models_json)
            listing = listing.get("models", listing) if isinstance(listing, dict) else listing
            memory["max_batch"] = {m["name"]: m.get("max_batch") for m in listing}
        except (ValueError, TypeError, KeyError):
            memory["max_batch"] = {}
        memory["idle"] = rss_kib(srv.pid)
        log(f"  ready in {memory['ready_s']:.1f} s, RSS {memory['idle']['VmRSS'] / 1024:.0f} MiB")
        # Warm-up: a short burst of photos on every loaded model (decode pool, every batch shape).
        t0 = time.perf_counter()
        for m in loaded:
            loadgen(f"{srv.base}/classify?model={m}", inputs["photo"], 8, plan.warmup_s, 0.0, None, plan.grace_s)
        memory["warm"] = rss_kib(srv.pid)
        memory["warmup_s"] = time.perf_counter() - t0
        log(f"  after warm-up RSS {memory['warm']['VmRSS'] / 1024:.0f} MiB")
        t0 = time.perf_counter()
        rows = []
        for name in plan.full:
            rows += _matrix(srv.base, name, inputs, plan, plan.load_s, srv.pid, metrics=True, raw_before_one_client=True)
        # The burst goes on over the models outside the matrix, so every session ran real traffic.
        for m in loaded:
            if m not in plan.full:
                loadgen(f"{srv.base}/classify?model={m}", inputs["photo"], 8, plan.burst_s, 0.0, None, plan.grace_s)
        memory["burst_s"] = time.perf_counter() - t0
        memory["after_burst"] = rss_kib(srv.pid)
        log(f"  after {memory['burst_s']:.0f} s of load RSS {memory['after_burst']['VmRSS'] / 1024:.0f} MiB "
            f"(peak {memory['after_burst']['VmHWM'] / 1024:.0f} MiB)")
        results["service"] = rows
        results["memory"] = memory
    finally:
        srv.stop()


def phase_naive(plan: Plan, results: dict, inputs: dict[str, Path]) -> None:
    rows = []
    for name in plan.full:
        port = free_port()
        srv = Process(f"naive {name}", [sys.executable, "-m", "benchmarks.naive_server", "--repo", str(plan.repo),
                                         "--model", name, "--port", str(port), "--threads", str(plan.naive_threads)],
                      python_env(), port, plan.work / f"naive-{name}.log")
        try:
            log(f"naive baseline {name}")
            srv.wait_ready(timeout=300)
            model_rows = _matrix(srv.base, name, inputs, plan, plan.naive_s, srv.pid, metrics=False)
            rss = rss_kib(srv.pid)
            for r in model_rows:
                r["server_rss_kib"] = rss["VmRSS"]
            rows += model_rows
        finally:
            srv.stop()
    results["naive"] = rows


# --- main -------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description="Benchmark the service against raw ONNX Runtime and a naive PyTorch server.")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny models, ~1 s per measurement, output to a temp dir")
    p.add_argument("--models", help="models measured with raw ORT (default b0..b7; quick: tiny,tiny2)")
    p.add_argument("--full-matrix", help="models that also get the batch sweep, the service and the naive baseline "
                                         "(default: those of --models among b0,b2,b4; quick: all)")
    p.add_argument("--memory-models", help="models loaded into the service (default b0..b7; quick: the quick models)")
    p.add_argument("--repo", type=Path, help=f"model repository (default {DEFAULT_REPO.relative_to(ROOT)}; quick: a temp copy)")
    p.add_argument("--out", type=Path, help="where benchmarks.{md,json,png} go (default docs/; quick: a temp dir)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, help="seconds per service measurement (default 6; quick 1)")
    p.add_argument("--naive-duration", type=float, help="seconds per naive measurement (default 5; quick 1)")
    p.add_argument("--raw-seconds", type=float, help="seconds per raw ORT batch size (default 2.5; quick 0.3)")
    p.add_argument("--naive-threads", type=int, help="torch threads in the naive server (default: PyTorch's default; quick: 1)")
    p.add_argument("--no-build", action="store_true", help="fail instead of building missing models")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace, argv: list[str]) -> Plan:
    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    quick = args.quick
    models = split(args.models) if args.models else (list(QUICK_MODELS) if quick else list(ALL_B))
    if args.full_matrix:
        full = split(args.full_matrix)
    else:
        full = list(models) if quick else [m for m in models if m in ("b0", "b2", "b4")] or models[:1]
    models = list(dict.fromkeys(full + models))
    memory = split(args.memory_models) if args.memory_models else (list(QUICK_MODELS) if quick else list(ALL_B))
    memory = list(dict.fromkeys(memory + full))
    phases = split(args.phases)
    if unknown := set(phases) - set(PHASES):
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    if quick:
        out = args.out or Path(tempfile.mkdtemp(prefix="effnet-bench-quick-"))
        if out.resolve() == DOCS.resolve():
            raise SystemExit("--quick never writes to docs/: its numbers are meaningless")
    else:
        out = args.out or DOCS
    work = Path(tempfile.mkdtemp(prefix="effnet-bench-work-"))
    repo = args.repo or (work / "repo" if quick else DEFAULT_REPO)
    return Plan(
        quick=quick, repo=repo, out=out, work=work, models=models, full=full, memory=memory, phases=phases,
        concurrency=[int(c) for c in split(args.concurrency)],
        raw_s=args.raw_seconds if args.raw_seconds is not None else (0.3 if quick else 2.5),
        load_s=args.duration if args.duration is not None else (1.0 if quick else 6.0),
        warmup_s=0.5 if quick else 1.0,
        naive_s=args.naive_duration if args.naive_duration is not None else (1.0 if quick else 5.0),
        burst_s=1.0 if quick else 3.0,
        grace_s=2.0 if quick else 60.0,
        # Smoke mode pins the naive server to one thread: on a shared CI runner PyTorch's OpenMP
        # pool (2 threads spin-waiting at every barrier) can take seconds per tiny forward pass.
        naive_threads=args.naive_threads if args.naive_threads is not None else (1 if quick else 0),
        prep_reps=3 if quick else 15,
        argv=argv,
    )


def prepare_repo(plan: Plan, allow_build: bool, temp_repo: bool) -> tuple[dict[str, dict], float]:
    """Build what is missing; returns each model's manifest and the seconds spent building."""
    needed = list(dict.fromkeys(plan.models + plan.memory))
    build_s = 0.0
    if temp_repo:
        # Build once into a persistent cache, then copy: the benchmark writes batch_sizes.json into
        # its repository, and the smoke run must not touch any repository but its own.
        build_s += build_models(QUICK_CACHE, [n for n in needed if n in QUICK_MODELS], allow_build)
        plan.repo.mkdir(parents=True, exist_ok=True)
        for n in needed:
            if n in QUICK_MODELS and not has_model(plan.repo, n):
                shutil.copytree(QUICK_CACHE / n, plan.repo / n)
    buildable = set(ALL_B) | set(QUICK_MODELS)
    build_s += build_models(plan.repo, [n for n in needed if n in buildable], allow_build)
    manifests = {n: json.loads((plan.repo / n / "manifest.json").read_text()) for n in needed if has_model(plan.repo, n)}
    return manifests, build_s


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = make_plan(args, argv)
    from benchmarks import report

    meta = report.machine_info()
    meta["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    meta["loadavg_start"] = os.getloadavg()
    manifests, meta["build_s"] = prepare_repo(plan, allow_build=not args.no_build, temp_repo=plan.quick and args.repo is None)
    missing = [m for m in plan.models if m not in manifests]
    if missing:
        raise SystemExit(f"models not in {plan.repo}: {', '.join(missing)}")

    # The server tunes malloc at start-up; do the same here so raw ORT and the preprocessing
    # timings run under the allocator settings the service runs under.
    from app.api.server import tune_malloc

    tune_malloc()
    t_run = time.perf_counter()
    inputs = make_inputs(plan, manifests)
    results: dict = {"phases": plan.phases, "timings_s": {}}
    for phase, fn in (("raw", lambda: phase_raw(plan, results)),
                      ("prep", lambda: phase_prep(plan, results, inputs)),
                      ("service", lambda: phase_service(plan, results, inputs)),
                      ("naive", lambda: phase_naive(plan, results, inputs))):
        if phase in plan.phases:
            t0 = time.perf_counter()
            fn()
            results["timings_s"][phase] = time.perf_counter() - t0
    meta["run_s"] = time.perf_counter() - t_run
    meta["loadavg_end"] = os.getloadavg()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    plan.out.mkdir(parents=True, exist_ok=True)
    paths = report.write(plan, meta, manifests, results)
    log(f"run took {meta['run_s']:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    shutil.rmtree(plan.work, ignore_errors=True)  # inputs, logs and the quick repo; kept when the run fails
    return 0


if __name__ == "__main__":
    sys.exit(main())
