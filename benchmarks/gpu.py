"""`make bench-gpu`: B0/B4/B7 on a GPU in one table, within 8 minutes, on a host nobody prepared.

    python -m benchmarks.gpu [--out DIR]     # raw ORT CUDA (+ TensorRT fp16), then the service: one table
    python -m benchmarks.gpu --cpu-smoke     # the same code path on the CPU with a tiny model, about a minute

1. pip installs what is missing (EFFNET_GPU_WHEELS=DIR: that wheelhouse first, then PyPI), onnxruntime-gpu too when
   there is a GPU but no CUDA EP; then the script restarts itself, so that the new packages import.
2. The models are built (`python -m effnet_serve build ... --weights random`, side by side) unless --repo has them.
3. Raw ORT: a default CUDA session (what ORT gives without us) at each batch; TensorRT fp16 when ORT has it.
4. The service with 1 and N (= cores) workers, both started at once, measured in turns with the other one frozen
   (SIGSTOP): gRPC tensors at the same batches (perf_analyzer, else a Python client) and HTTP JPEGs (loadgen).
A row that cannot run says why ("n/a: ..."); without a working CUDA EP the rows run on the CPU. Exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import re
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import perf_analyzer as pa
from benchmarks.harness import ROOT, Process, batch_metrics, build_args, free_port, has_model, loadgen, log, python_env
from benchmarks.loadgen import percentile
from benchmarks.blocks import machine_info
from benchmarks.blocks import Contender, cores

T0 = float(os.environ.get("EFFNET_GPU_BENCH_T0") or time.time())  # kept across the restart after pip
CUDA, TRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"
# module -> distributions; the versions come from pyproject.toml, so they live in one place. tritonclient's generated
# code refuses to import beside an older grpcio or protobuf: when it fails, those are installed (upgraded) too.
NEEDS = {"numpy": "numpy", "PIL": "pillow", "onnxruntime": "onnxruntime", "fastapi": "fastapi", "uvicorn": "uvicorn",
         "pydantic_settings": "pydantic-settings", "multipart": "python-multipart", "orjson": "orjson",
         "prometheus_client": "prometheus-client", "grpc": "grpcio", "tritonclient.grpc": "tritonclient grpcio protobuf",
         "torch": "torch", "onnx": "onnx", "onnxscript": "onnxscript", "tqdm": "tqdm"}
BUILD = {"torch", "onnx", "onnxscript", "tqdm"}  # only `python -m effnet_serve build`, a child process, imports these


@dataclass
class Row:
    model: str
    path: str  # "raw ORT CUDA", "service gRPC tensors, 16 workers", ...
    device: str
    load: str  # "batch 8" or "64 clients"
    img_per_s: float | None = None
    p50_ms: float | None = None  # per call: a batch (raw, gRPC) or an image (HTTP)
    note: str = ""


def say(msg: str) -> None:
    log(f"+{time.time() - T0:4.0f}s {msg}")


def left(args: argparse.Namespace) -> float:
    return args.budget - (time.time() - T0)


def short(exc: BaseException | str) -> str:
    """An exception or a log, in one line: its last one (a traceback's is the error)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or ["?"]
    return (lines[-1] if isinstance(exc, str) else f"{type(exc).__name__}: {lines[-1]}")[:160]


# --- 1. dependencies and models ------------------------------------------------------------------------------
def probe() -> dict:
    info: dict = {"missing": {}, "providers": []}
    for m in NEEDS:
        try:  # torch & co: only whether they are there; importing torch here would cost seconds and GPU memory
            if (importlib.util.find_spec(m) if m in BUILD else importlib.import_module(m)) is None:
                info["missing"][m] = "not installed"
        except Exception as exc:  # noqa: BLE001 - a broken install (grpcio too old for tritonclient) is missing too
            info["missing"][m] = short(exc)
    if "onnxruntime" not in info["missing"]:
        import onnxruntime as ort  # if pip brings onnxruntime-gpu, the restart loads that one instead

        info.update(ort=ort.__version__, providers=ort.get_available_providers())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = ""
    return {**info, "gpu": smi.splitlines()[0] if smi else None}


def requirement(dist: str) -> str:
    if dist == "torch":
        return "torch"  # pyproject pins the CPU build; a GPU host keeps its own
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [r for r in project["dependencies"] + project["optional-dependencies"]["build"]
             if re.match(rf"{re.escape(dist)}\b(?![-.])", r, re.I)]
    return found[0] if found else dist


def pip_install(wants: list[list[str]]) -> list[str]:
    """One requirement at a time (a wheelhouse may hold only some), each a list of alternatives, the first that
    installs wins; -> those that failed."""
    wheels = os.environ.get("EFFNET_GPU_WHEELS")
    sources = ([["--no-index", "--find-links", wheels]] if wheels else []) + [["--retries", "0", "--timeout", "15"]]
    # PEP 668: a distribution's own Python refuses pip without this; the hosts we borrow are throwaway.
    managed = sys.prefix == sys.base_prefix and Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists()

    def pip(spec: str, src: list[str]) -> bool:
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                *(["--break-system-packages"] if managed else []), *src, spec],
                               capture_output=True, text=True, timeout=300)
            why = "ok" if r.returncode == 0 else short(r.stderr)
        except (OSError, subprocess.SubprocessError) as exc:
            why = short(exc)
        say(f"pip install {spec} from {'the wheelhouse' if '--no-index' in src else 'PyPI'}: {why}")
        return why == "ok"

    return [alts[0] for alts in wants if not any(pip(spec, src) for src in sources for spec in alts)]


def ensure_deps(args: argparse.Namespace) -> dict:
    info = probe()
    if "EFFNET_GPU_BENCH_PIP_FAILED" in os.environ:  # this is the restart: what could be installed, is
        return {**info, "pip_failed": json.loads(os.environ["EFFNET_GPU_BENCH_PIP_FAILED"])}
    reqs = dict.fromkeys(requirement(d) for m, ds in NEEDS.items() if m in info["missing"] for d in ds.split())
    want = [[r] for r in reqs]
    if info["gpu"] and not args.cpu_smoke and CUDA not in info["providers"]:
        # onnxruntime-gpu is the same `onnxruntime` package as the CPU wheel: installed over it, it wins. Its
        # versions do not follow the CPU wheel's (no 1.32.0 on PyPI): the same version if there is one, else any.
        want = [w for w in want if not w[0].startswith("onnxruntime")] + [
            [f"onnxruntime-gpu=={info['ort']}", "onnxruntime-gpu"] if info.get("ort") else ["onnxruntime-gpu"]]
    if not want:
        return info
    say(f"missing: {', '.join(w[0] for w in want)}")
    failed = pip_install(want)
    # A fresh interpreter sees what pip put in place (a user site made just now, onnxruntime-gpu's library).
    os.environ.update(EFFNET_GPU_BENCH_T0=str(T0), EFFNET_GPU_BENCH_PIP_FAILED=json.dumps(failed))
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpu", *sys.argv[1:]])


def build(repo: Path, models: list[str], work: Path) -> dict[str, str]:
    """Side by side, the cores shared out (B7 alone takes longest); -> model -> why it could not be built."""
    missing = [m for m in models if not has_model(repo, m)]
    env = {**python_env(), "OMP_NUM_THREADS": str(max(1, cores() // max(1, len(missing))))}
    logs = {m: work / f"build-{m}.log" for m in missing}
    cmd = [sys.executable, "-m", "effnet_serve", "build", "--repo", str(repo), "--quiet"]  # the checkout's `effnet build`
    procs = {m: subprocess.Popen([*cmd, *build_args(m)], env=env, cwd=ROOT, stdout=logs[m].open("w"),
                                 stderr=subprocess.STDOUT) for m in missing}
    failed = {m: "n/a: build failed: " + short(logs[m].read_text()) for m, p in procs.items() if p.wait()}
    say(f"built {', '.join(missing) or 'nothing (all in the repository)'}; failed: {failed or 'none'}")
    return failed


# --- 2. raw ONNX Runtime, in this process, timed by benchmarks.raw_ort -----------------------------------------
def raw_rows(args: argparse.Namespace, models: list[str], what: str, reserve: float) -> list[Row]:
    """what: "raw ORT CUDA" | "TensorRT fp16" | "raw ORT CPU"; a session per model, then each batch, unless that
    would leave less than `reserve` seconds for what comes after."""
    import onnxruntime as ort

    from benchmarks import raw_ort

    rows, device = [], "cpu" if what.endswith("CPU") else "cuda"
    if device == "cuda" and hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip's nvidia packages (torch's)
        with contextlib.redirect_stdout(sys.stderr):  # it prints what it cannot find; stdout is the table's
            ort.preload_dlls()
    for model in models:
        try:
            path, iname, oname, crop = raw_ort.model_file(args.repo / model)
            shape = lambda b, i=iname, c=crop: f"{i}:{b}x3x{c}x{c}"  # noqa: E731 - one TensorRT profile for every batch
            prov, opts = (CUDA, {}) if what == "raw ORT CUDA" else (TRT, {
                "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(args.cache / "trt"), "trt_profile_min_shapes": shape(1),
                "trt_profile_opt_shapes": shape(max(1, max(args.batches) // 4)),
                "trt_profile_max_shapes": shape(max(args.batches))})
            if device == "cpu":
                run = raw_ort.default_session(path, iname, oname, cores())
            else:
                chain = [(prov, opts)] + [CUDA] * (prov == TRT)  # what TensorRT cannot take goes to CUDA, not the CPU
                session = ort.InferenceSession(str(path), providers=[*chain, "CPUExecutionProvider"])
                if session.get_providers()[0] != prov:  # ORT falls back to the CPU with only a warning
                    raise RuntimeError(f"{prov} did not initialise (its CUDA/cuDNN/TensorRT libraries?)")
                run = lambda x, s=session, o=oname, i=iname: s.run([o], {i: x})[0]  # noqa: E731
        except Exception as exc:  # noqa: BLE001 - the rows say why; the run goes on
            rows += [Row(model, what, device, f"batch {b}", note=f"n/a: {short(exc)}") for b in args.batches]
            continue
        for b in args.batches:
            row = Row(model, what, device, f"batch {b}")
            if left(args) < args.block * 3 + reserve:
                row.note = "n/a: skipped (time budget)"
            else:
                try:
                    r = raw_ort.measure_one(run, crop, b, args.block)
                    row.img_per_s, row.p50_ms = r["img_per_s"], r["batch_ms_p50"]
                except Exception as exc:  # noqa: BLE001 - out of GPU memory, say
                    row.note = f"n/a: {short(exc)}"
            say(f"{model} {what} batch {b}: {row.img_per_s or 0:.0f} img/s {row.note}")
            rows.append(row)
        run = session = None
        gc.collect()  # this session's GPU arena goes before the next model's
    return rows


# --- 3. the service ------------------------------------------------------------------------------------------
def nvidia_libs() -> list[str]:
    """Folders of the CUDA/cuDNN libraries pip put under site-packages/nvidia (with torch, say): the service's ORT
    finds them only on LD_LIBRARY_PATH, as app/ does not call onnxruntime.preload_dlls()."""
    roots = [Path(p) / "nvidia" for p in site.getsitepackages() + [site.getusersitepackages()]]
    return sorted({str(lib.parent) for root in roots if root.is_dir() for lib in root.glob("**/lib*.so*")})


def start_service(args: argparse.Namespace, workers: int, device: str, crops: dict[str, int]) -> Contender:
    env = {k: v for k, v in python_env().items() if not k.startswith("EFFNET_")}
    if device == "cuda":
        env["LD_LIBRARY_PATH"] = ":".join(nvidia_libs() + [env.get("LD_LIBRARY_PATH", "")]).strip(":")
    request = max(max(args.grpc_batches[m]) * 3 * crops[m] ** 2 * 4 for m in args.models) >> 20  # MB, the biggest
    env.update(EFFNET_REPOSITORY=str(args.repo), EFFNET_MODELS=",".join(args.models), EFFNET_DEVICE=device,
               EFFNET_DEFAULT_MODEL=args.models[0], EFFNET_WORKERS=str(workers), EFFNET_GRPC_PORT=str(free_port()),
               # a batch-256 tensor request is far above the 20 MB body and the 256-image queue defaults
               EFFNET_MAX_BODY_MB=str(request + 16), EFFNET_MAX_QUEUE=str(max(256, 4 * max(args.batches))),
               EFFNET_DRAIN_S="2",  # nothing is in flight when it is stopped: no need to wait the default 20 s
               # CUDA like the raw rows (the goal's baseline); TensorRT would also build an engine per batch shape
               EFFNET_TENSORRT="false",
               **{"EFFNET_MAX_BATCH_" + re.sub(r"[^A-Z0-9]", "_", m.upper()): str(max(args.grpc_batches[m]))
                  for m in args.models})
    shm, need = os.statvfs("/dev/shm"), request * args.concurrency + 32  # a worker's arena holds its requests
    if workers > 1 and need > 256 and shm.f_bavail * shm.f_frsize * 0.8 > workers * need << 20:
        env["EFFNET_SHM_MB"] = str(need)  # else the supervisor's default, and such requests get 503 (the note says)
    port = free_port()
    proc = Process(f"service, {workers} worker(s)", [sys.executable, "-m", "effnet_serve", "serve", "--port", str(port)],
                   env, port, args.out / f"service-w{workers}.log")
    return Contender(str(workers), proc, int(env["EFFNET_GRPC_PORT"]))


def grpc_python(port: int, model: str, iname: str, crop: int, batch: int, conc: int, seconds: float,
                warmup: float) -> dict:
    """A closed loop of `conc` clients, a connection each; the request is serialised once, so a call costs a copy."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=iname, datatype="FP32", shape=[batch, 3, crop, crop])
    x = np.random.default_rng(0).standard_normal((batch, 3, crop, crop), np.float32)
    req.raw_input_contents.append(x.tobytes())
    body, done, errors = req.SerializeToString(), [], []
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds

    def client() -> None:
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1)]  # a TCP connection of its own: spread over the workers
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
            while (t0 := time.perf_counter()) < t_end:
                try:
                    call(body, timeout=60)
                    done.append((t0, time.perf_counter()))
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}"[:150])

    threads = [threading.Thread(target=client) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(1000 * (b - a) for a, b in done if a >= t_start)
    ok = sum(1 for _, b in done if t_start <= b <= t_end)
    return {"img_per_s": ok * batch / seconds, "p50_ms": percentile(lat, 50), "errors": len(errors),
            "first_error": errors[0] if errors else None, "client": "python"}


def measure_grpc(args: argparse.Namespace, c: Contender, model: str, iname: str, crop: int, batch: int) -> dict:
    """perf_analyzer where `make perf-analyzer` installed it; where it cannot run (no libb64, say) or its windows
    did not agree, the Python client."""
    if args.grpc_client == "auto" and pa.binary():
        csv = args.out / f"pa-{model}-{batch}-{c.name}w.csv"  # a fresh file: pa.run reads whatever CSV is there
        r = pa.run(f"127.0.0.1:{c.grpc_port}", model, "grpc", batch, args.concurrency, int(args.block * 500), 3,
                   csv, timeout=args.block * 5 + 60, stability_pct=60)
        if r.get("img_per_s"):
            return {**r, "client": "perf_analyzer"}
        say(f"perf_analyzer: {r.get('status')}; the Python client instead")
    return grpc_python(c.grpc_port, model, iname, crop, batch, args.concurrency, args.block, args.warmup)


def photo(work: Path, size: int) -> Path:
    """A gradient with grain at the model's size: decodes like a photo, and needs no scikit-image on the GPU host."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    px = np.stack([x, y, 1 - x], -1) * 255 + np.random.default_rng(0).normal(0, 12, (size, size, 3))
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(path := work / f"photo-{size}px.jpg", quality=90)
    return path


def service_rows(args: argparse.Namespace, device: str) -> list[Row]:
    from benchmarks.raw_ort import model_file

    files = {m: model_file(args.repo / m) for m in args.models}
    crops = {m: f[3] for m, f in files.items()}
    started = {w: start_service(args, w, device, crops) for w in sorted({1, cores()})}  # they load side by side
    rows, broken = [], {}
    try:
        for w, c in started.items():
            try:
                ready_s = c.proc.wait_ready(max(30.0, min(300.0, left(args) - 30)))
                say(f"service, {w} worker(s): ready after {ready_s:.0f} s")
            except RuntimeError as exc:
                broken[w] = short(str(exc))
                say(f"service, {w} worker(s), did not start: {broken[w]}")
        plan = [(m, "gRPC tensors", f"batch {b}") for m in args.models for b in args.grpc_batches[m]]
        for model, kind, load in plan + [(m, "HTTP JPEG", f"{args.clients} clients") for m in args.models]:
            for w, c in started.items():
                row = Row(model, f"service {kind}, {w} worker{'s' * (w > 1)}", device, load)
                rows.append(row)
                if w in broken or left(args) < args.block + args.warmup + 30:
                    row.note = f"n/a: did not start ({broken[w]})" if w in broken else "n/a: skipped (time budget)"
                    continue
                for other in started.values():  # the other service sleeps through this window
                    other.signal(signal.SIGCONT if other is c else signal.SIGSTOP)
                before = batch_metrics(c.proc.base).get(model, (0.0, 0.0))
                try:
                    r = (measure_grpc(args, c, model, files[model][1], crops[model], int(load.split()[1]))
                         if kind == "gRPC tensors" else
                         loadgen(f"{c.proc.base}/classify?model={model}", photo(args.out, crops[model]), args.clients,
                                 args.block, args.warmup, 10.0, server_pgid=c.proc.pid))
                except Exception as exc:  # noqa: BLE001
                    r = {"first_error": short(exc)}
                s, n = (a - b for a, b in zip(batch_metrics(c.proc.base).get(model, (0.0, 0.0)), before))
                row.img_per_s, row.p50_ms = r.get("img_per_s") or None, r.get("p50_ms")
                notes = [f"model batch {s / n:.1f}" if n else "", f"{r['client']} client" if "client" in r else "",
                         f"{r.get('errors')} errors, {r['first_error']}" if r.get("first_error") else ""]
                row.note = "; ".join(x for x in notes if x)  # model batch: what ORT ran, from the service's /metrics
                say(f"{model} {row.path} {load}: {row.img_per_s or 0:.0f} img/s {row.note}")
    finally:
        for c in started.values():
            c.stop()
    return rows


# --- 4. the table --------------------------------------------------------------------------------------------
def render(rows: list[Row], header: list[str], goal: str) -> str:
    num = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    return "\n".join([*header, "", "| model | path | device | batch / clients | img/s | p50 ms | note |",
                      "| --- | --- | --- | ---: | ---: | ---: | --- |",
                      *(f"| {r.model} | {r.path} | {r.device} | {r.load} | {num(r.img_per_s, '.0f')} | "
                        f"{num(r.p50_ms, '.1f')} | {r.note} |" for r in rows), "", goal])


def goal_line(rows: list[Row], model: str, raw_path: str) -> str:
    """The service over gRPC tensors against raw ORT at the same batch; the better worker count counts."""
    parts, met = [], []
    for raw in (r for r in rows if r.model == model and r.path == raw_path and r.img_per_s):
        svc = {r.path.split(", ")[-1]: r.img_per_s / raw.img_per_s for r in rows
               if r.model == model and r.load == raw.load and "gRPC" in r.path and r.img_per_s}
        if svc:
            parts.append(f"{raw.load}: " + ", ".join(f"{x:.2f}× ({w})" for w, x in svc.items()))
            met.append(max(svc.values()) >= 0.8)
    verdict = "not measured" if not met else "met" if all(met) else f"met at {sum(met)} of {len(met)} batches"
    return (f"Goal: {model} through the service (gRPC tensors) ≥ 0.8 × {raw_path} at the same batch: "
            f"{'; '.join(parts) or '–'} → **{verdict}**")


def phase(args: argparse.Namespace, path: str, device: str, rows: Callable[[], list[Row]]) -> list[Row]:
    """A whole phase that failed (a module missing, say) is a row that says why; the others still run."""
    try:
        return rows()
    except Exception as exc:  # noqa: BLE001
        say(f"{path}: {short(exc)}")
        return [Row(args.models[0], path, device, "–", note=f"n/a: {short(exc)}")]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the CPU, a tiny model, 1 s blocks: checks the script")
    p.add_argument("--out", type=Path, help="folder for gpu-bench.md/.json and the logs (default: a temp dir)")
    p.add_argument("--repo", type=Path, default=ROOT / ".cache" / "gpu-bench" / "models")
    p.add_argument("--models", help="comma list (default b0,b4,b7; tiny with --cpu-smoke); the first is the goal's")
    p.add_argument("--budget", type=float, help="seconds for the whole run; rows past it say skipped (default 440)")
    p.add_argument("--grpc-client", choices=["auto", "python"], default="auto",
                   help="auto: perf_analyzer where `make perf-analyzer` installed it and it runs; else python")
    p.add_argument("--trt-models", default="b0", help="models with TensorRT rows (an engine build each; B7's: minutes)")
    args = p.parse_args()
    smoke = args.cpu_smoke
    args.models = (args.models or ("tiny" if smoke else "b0,b4,b7")).split(",")
    args.batches = [1, 8, 32] if smoke else [1, 8, 32, 128, 256]
    args.block, args.warmup, args.clients, args.concurrency = (1.0, 0.3, 16, 2) if smoke else (2.5, 1.0, 64, 2)
    args.budget = args.budget or (180.0 if smoke else 440.0)  # + stopping the services: within 8 minutes
    args.reserve = args.budget * 0.45  # what raw ORT leaves the service: its start, B0's gRPC and HTTP rows
    args.cache = ROOT / ".cache" / "gpu-bench"

    info = ensure_deps(args)
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    args.out.mkdir(parents=True, exist_ok=True)
    providers = info["providers"]
    say(f"GPU: {info['gpu'] or 'none'}; onnxruntime {info.get('ort')} {providers}; missing: {sorted(info['missing'])}")
    failed = build(args.repo, args.models, args.out)
    rows = [Row(m, "build", "cpu", "–", note=why) for m, why in failed.items()]
    args.models = [m for m in args.models if m not in failed]
    if "onnxruntime" in info["missing"] or not args.models:
        print(render(rows, ["bench-gpu: nothing to measure (no onnxruntime, or no model built)"], ""))
        return 0
    no_cuda = ("--cpu-smoke" if smoke else "no GPU found" if not info["gpu"] else
               "no CUDAExecutionProvider (onnxruntime-gpu not installed)" if CUDA not in providers else "")
    if not no_cuda:
        rows += phase(args, "raw ORT CUDA", "cuda", lambda: raw_rows(args, args.models, "raw ORT CUDA", args.reserve))
        first = [r for r in rows if r.path == "raw ORT CUDA" and r.model == args.models[0]]
        if all(r.note.startswith("n/a") and "time budget" not in r.note for r in first):  # listed, but it failed
            no_cuda = first[0].note[5:]
    if no_cuda:  # every row it can: the same paths on the CPU, at the batches a CPU gets through in time
        say(f"no CUDA ({no_cuda}): the rows run on the CPU")
        args.batches = [b for b in args.batches if b <= 32]
        rows = [r for r in rows if r.path != "raw ORT CUDA"] + [
            Row(m, "raw ORT CUDA", "cuda", "–", note=f"n/a: {no_cuda}") for m in args.models]
        rows += phase(args, "raw ORT CPU", "cpu", lambda: raw_rows(args, args.models, "raw ORT CPU", args.reserve))
    device = "cpu" if no_cuda else "cuda"
    # The goal is about the first model at every batch; the others get the first batch and a middle one.
    some = sorted({args.batches[0], args.batches[len(args.batches) // 2]})
    args.grpc_batches = {m: args.batches if m == args.models[0] else some for m in args.models}
    rows += phase(args, "service", device, lambda: service_rows(args, device))
    trt = [m for m in args.models if m in args.trt_models.split(",")]
    if device == "cuda" and TRT in providers and trt and left(args) > 150:  # last: an engine build takes minutes
        rows += phase(args, "TensorRT fp16", "cuda", lambda: raw_rows(args, trt, "TensorRT fp16", 20.0))
    order = ["build", "raw ORT CUDA", "TensorRT fp16", "raw ORT CPU"]
    rows.sort(key=lambda r: (args.models.index(r.model) if r.model in args.models else -1,
                             order.index(r.path) if r.path in order else len(order) + ("HTTP" in r.path)))
    goal = goal_line(rows, args.models[0], "raw ORT CPU" if no_cuda else "raw ORT CUDA")
    machine = {**machine_info(), "gpu": info["gpu"], "onnxruntime": info.get("ort"), "providers": providers,
               "missing": info["missing"], "pip_failed": info.get("pip_failed", []), "device": device}
    header = [f"bench-gpu, {time.time() - T0:.0f} s: GPU {info['gpu'] or 'none'}; onnxruntime {info.get('ort')} "
              f"({', '.join(providers)}); {machine.get('cores')} cores ({machine.get('cpu')}); gRPC: "
              f"{args.concurrency} requests in flight; {args.block:g} s per measurement"]
    if no_cuda:
        header.append(f"**No CUDA: {no_cuda}.** The rows that need it say n/a; the others ran on the CPU.")
    if info["missing"]:
        header.append(f"Missing (the rows that need them say n/a): {', '.join(sorted(info['missing']))}.")
    if info.get("pip_failed"):
        header.append(f"pip could not install {', '.join(info['pip_failed'])} "
                      f"(EFFNET_GPU_WHEELS={os.environ.get('EFFNET_GPU_WHEELS', 'unset')}, then PyPI).")
    text = render(rows, header, goal)
    plan = {k: getattr(args, k) for k in ("models", "batches", "block", "warmup", "clients", "concurrency", "budget")}
    (args.out / "gpu-bench.md").write_text(text + "\n")
    (args.out / "gpu-bench.json").write_text(json.dumps(
        {"machine": machine, "plan": plan, "goal": goal, "seconds": round(time.time() - T0, 1),
         "records": [asdict(r) for r in rows]}, indent=2, default=str) + "\n")
    print(text)
    say(f"wrote {args.out}/gpu-bench.md and gpu-bench.json (the logs beside them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
