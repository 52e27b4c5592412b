"""`make bench-gpu`: B0/B4/B7 on a GPU in one table, within 8 minutes, on a host nobody prepared.

    python -m benchmarks.gpu [--out DIR]     # raw ORT CUDA (+ TensorRT fp16), then the service: one table
    python -m benchmarks.gpu --cpu-smoke     # the same code path on the CPU with a tiny model, about a minute

1. pip installs what is missing (EFFNET_GPU_WHEELS=DIR: that wheelhouse first, then PyPI), onnxruntime-gpu too when
   there is a GPU but no CUDA EP; then the script restarts itself, so that the new packages import.
2. The models are built side by side (`python -m effnet_serve build ... --weights random`) unless --repo has them.
3. Raw ORT: a default CUDA session (what ORT gives without us) at each batch; TensorRT fp16 when ORT has it.
4. The service with 1 and N (= cores) workers, both started at once, measured in turns with the other one frozen
   (SIGSTOP): gRPC tensors at the same batches (perf_analyzer, else a Python client) and HTTP JPEGs (loadgen).
A row that cannot run says why ("n/a: ..."); without a working CUDA EP the rows run on the CPU. Exit 0. The rows are
records (benchmarks.records.GpuRow) appended to <out>/benchmarks.jsonl; the table is their section of the report.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
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
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import perf_analyzer as pa
from benchmarks.blocks import Contender, cores, machine_info, start_service
from benchmarks.harness import ROOT, batch_metrics, build_args, has_model, loadgen, log, python_env
from benchmarks.loadgen import percentile
from benchmarks.records import Bench, GpuRow, append

T0 = float(os.environ.get("EFFNET_GPU_BENCH_T0") or time.time())  # kept across the restart after pip
CUDA, TRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"
# module -> distributions (versions from pyproject.toml). tritonclient's generated code refuses to import beside an
# older grpcio or protobuf: when it fails, those are installed (upgraded) too.
NEEDS = {"numpy": "numpy", "PIL": "pillow", "onnxruntime": "onnxruntime", "fastapi": "fastapi", "uvicorn": "uvicorn",
         "pydantic_settings": "pydantic-settings", "multipart": "python-multipart", "orjson": "orjson",
         "prometheus_client": "prometheus-client", "grpc": "grpcio", "tritonclient.grpc": "tritonclient grpcio protobuf",
         "torch": "torch", "onnx": "onnx", "onnxscript": "onnxscript", "tqdm": "tqdm"}
BUILD = {"torch", "onnx", "onnxscript", "tqdm"}  # only the build, a child process, imports these


def say(msg: str) -> None:
    log(f"+{time.time() - T0:4.0f}s {msg}")


def left(args: argparse.Namespace) -> float:
    return args.budget - (time.time() - T0)


def short(exc: BaseException | str) -> str:
    """An exception or a log in one line: its last one (a traceback's is the error)."""
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
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout.strip().split("\n")[0] or None
    return {"gpu": None, **info}


def requirement(dist: str) -> str:
    if dist == "torch":
        return "torch"  # pyproject pins the CPU build; a GPU host keeps its own
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next((r for r in project["dependencies"] + project["optional-dependencies"]["build"]
                 if re.match(rf"{re.escape(dist)}\b(?![-.])", r, re.I)), dist)


def ensure_deps(args: argparse.Namespace) -> dict:
    """pip install what is missing, one requirement at a time (a wheelhouse may hold only some), each a list of
    alternatives, the first that installs wins; then this script again in a fresh interpreter."""
    info = probe()
    if "EFFNET_GPU_BENCH_PIP_FAILED" in os.environ:  # this is the restart: what could be installed, is
        return {**info, "pip_failed": json.loads(os.environ["EFFNET_GPU_BENCH_PIP_FAILED"])}
    want = [[r] for r in dict.fromkeys(requirement(d) for m, ds in NEEDS.items() if m in info["missing"] for d in ds.split())]
    if info["gpu"] and not args.cpu_smoke and CUDA not in info["providers"]:
        # onnxruntime-gpu is the same `onnxruntime` package: installed over the CPU wheel, it wins. Its versions do not
        # follow the CPU wheel's: the same version if there is one, else any.
        want = [w for w in want if not w[0].startswith("onnxruntime")] + [
            [f"onnxruntime-gpu=={info['ort']}", "onnxruntime-gpu"] if info.get("ort") else ["onnxruntime-gpu"]]
    if not want:
        return info
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

    say(f"missing: {', '.join(w[0] for w in want)}")
    failed = [alts[0] for alts in want if not any(pip(spec, src) for src in sources for spec in alts)]
    os.environ.update(EFFNET_GPU_BENCH_T0=str(T0), EFFNET_GPU_BENCH_PIP_FAILED=json.dumps(failed))
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpu", *sys.argv[1:]])


def build(repo: Path, models: list[str], work: Path) -> dict[str, str]:
    """Side by side, the cores shared out (B7 alone takes longest); -> model -> why it could not be built."""
    missing = [m for m in models if not has_model(repo, m)]
    env = {**python_env(), "OMP_NUM_THREADS": str(max(1, cores() // max(1, len(missing))))}
    cmd = [sys.executable, "-m", "effnet_serve", "build", "--repo", str(repo), "--quiet"]
    procs = {m: subprocess.Popen([*cmd, *build_args(m)], env=env, cwd=ROOT, stdout=(work / f"build-{m}.log").open("w"),
                                 stderr=subprocess.STDOUT) for m in missing}
    failed = {m: "n/a: build failed: " + short((work / f"build-{m}.log").read_text()) for m, p in procs.items() if p.wait()}
    say(f"built {', '.join(missing) or 'nothing (all in the repository)'}; failed: {failed or 'none'}")
    return failed


# --- 2. raw ONNX Runtime, in this process, timed by benchmarks.raw_ort -----------------------------------------
def session(args: argparse.Namespace, path: Path, iname: str, oname: str, crop: int, what: str):
    from benchmarks import raw_ort

    if what == "raw ORT CPU":
        return raw_ort.default_session(path, iname, oname, cores())
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip's nvidia packages (torch's)
        with contextlib.redirect_stdout(sys.stderr):  # it prints what it cannot find; stdout is the table's
            ort.preload_dlls()
    shape = lambda b: f"{iname}:{b}x3x{crop}x{crop}"  # noqa: E731 - one TensorRT profile for every batch
    chain = [(CUDA, {})] if what == "raw ORT CUDA" else [(TRT, {
        "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(args.cache / "trt"),
        "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(max(1, max(args.batches) // 4)),
        "trt_profile_max_shapes": shape(max(args.batches))}), CUDA]  # what TensorRT cannot take goes to CUDA, not the CPU
    s = ort.InferenceSession(str(path), providers=[*chain, "CPUExecutionProvider"])
    if s.get_providers()[0] != chain[0][0]:  # ORT falls back to the CPU with only a warning
        raise RuntimeError(f"{chain[0][0]} did not initialise (its CUDA/cuDNN/TensorRT libraries?)")
    return lambda x: s.run([oname], {iname: x})[0]


def raw_rows(args: argparse.Namespace, models: list[str], what: str, reserve: float) -> list[GpuRow]:
    """A session per model, then each batch, unless that would leave less than `reserve` seconds for what follows."""
    from benchmarks import raw_ort

    rows, device = [], "cpu" if what.endswith("CPU") else "cuda"
    for model in models:
        try:
            path, iname, oname, crop = raw_ort.model_file(args.repo / model)
            run = session(args, path, iname, oname, crop, what)
        except Exception as exc:  # noqa: BLE001 - the rows say why; the run goes on
            rows += [GpuRow(model, what, device, f"batch {b}", note=f"n/a: {short(exc)}") for b in args.batches]
            continue
        for b in args.batches:
            row = GpuRow(model, what, device, f"batch {b}")
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
        run = None
        gc.collect()  # this session's GPU arena goes before the next model's
    return rows


# --- 3. the service ------------------------------------------------------------------------------------------
def grpc_python(port: int, model: str, iname: str, crop: int, batch: int, conc: int, seconds: float, warmup: float) -> dict:
    """A closed loop of `conc` clients, a connection each; the request is serialised once, so a call costs a copy."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    from benchmarks.raw_ort import input_for

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=iname, datatype="FP32", shape=[batch, 3, crop, crop])
    req.raw_input_contents.append(input_for(crop, batch).tobytes())
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

    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(lambda _: client(), range(conc)))
    lat = sorted(1000 * (b - a) for a, b in done if a >= t_start)
    return {"img_per_s": sum(1 for _, b in done if t_start <= b <= t_end) * batch / seconds, "p50_ms": percentile(lat, 50),
            "errors": len(errors), "first_error": errors[0] if errors else None, "client": "python"}


def photo(work: Path, size: int) -> Path:
    """A gradient with grain at the model's size: decodes like a photo, and needs no scikit-image on the GPU host."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    px = np.stack([x, y, 1 - x], -1) * 255 + np.random.default_rng(0).normal(0, 12, (size, size, 3))
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(path := work / f"photo-{size}px.jpg", quality=90)
    return path


def service_rows(args: argparse.Namespace, device: str) -> list[GpuRow]:
    from benchmarks import raw_ort

    files = {m: raw_ort.model_file(args.repo / m) for m in args.models}
    request = max(max(args.grpc_batches[m]) * 3 * files[m][3] ** 2 * 4 for m in args.models) >> 20  # MB, the biggest
    env = {"EFFNET_DEVICE": device, "EFFNET_MAX_BODY_MB": str(request + 16),  # a batch-256 tensor is far above 20 MB
           "EFFNET_MAX_QUEUE": str(max(256, 4 * max(args.batches))), "EFFNET_DRAIN_S": "2", "EFFNET_TENSORRT": "false",
           **{"EFFNET_MAX_BATCH_" + re.sub(r"[^A-Z0-9]", "_", m.upper()): str(max(args.grpc_batches[m])) for m in args.models}}
    if device == "cuda":  # app/ does not call onnxruntime.preload_dlls(): pip's CUDA/cuDNN libraries on the path
        libs = {str(lib.parent) for p in site.getsitepackages() + [site.getusersitepackages()]
                if (Path(p) / "nvidia").is_dir() for lib in (Path(p) / "nvidia").glob("**/lib*.so*")}
        env["LD_LIBRARY_PATH"] = ":".join([*sorted(libs), os.environ.get("LD_LIBRARY_PATH", "")]).strip(":")
    shm, need = os.statvfs("/dev/shm"), request * args.concurrency + 32  # a worker's arena holds its requests
    started: dict[int, Contender] = {}
    for w in sorted({1, cores()}):  # they load side by side
        big = w > 1 and need > 256 and shm.f_bavail * shm.f_frsize * 0.8 > w * need << 20
        started[w] = start_service(args.out, args.repo, ",".join(args.models), w, {**env, **({"EFFNET_SHM_MB": str(need)} if big else {})},
                                   ready_s=0)
    rows, broken = [], {}
    try:
        for w, c in started.items():
            try:
                say(f"service, {w} worker(s): ready after {c.proc.wait_ready(max(30.0, min(300.0, left(args) - 30))):.0f} s")
            except RuntimeError as exc:
                broken[w] = short(str(exc))
                say(f"service, {w} worker(s), did not start: {broken[w]}")
        plan = [(m, "gRPC tensors", f"batch {b}") for m in args.models for b in args.grpc_batches[m]]
        for model, kind, load in plan + [(m, "HTTP JPEG", f"{args.clients} clients") for m in args.models]:
            iname, crop = files[model][1], files[model][3]
            for w, c in started.items():
                row = GpuRow(model, f"service {kind}, {w} worker{'s' * (w > 1)}", device, load)
                rows.append(row)
                if w in broken or left(args) < args.block + args.warmup + 30:
                    row.note = f"n/a: did not start ({broken[w]})" if w in broken else "n/a: skipped (time budget)"
                    continue
                for other in started.values():  # the other service sleeps through this window
                    other.signal(signal.SIGCONT if other is c else signal.SIGSTOP)
                before = batch_metrics(c.proc.base).get(model, (0.0, 0.0))
                try:
                    if kind == "HTTP JPEG":
                        r = loadgen(f"{c.proc.base}/classify?model={model}", photo(args.out, crop), args.clients, args.block,
                                    args.warmup, 10.0, server_pgid=c.proc.pid)
                    else:
                        r = {}
                        if args.grpc_client == "auto" and pa.binary():  # else, or when its windows disagree: Python
                            r = pa.run(f"127.0.0.1:{c.grpc_port}", model, "grpc", int(load.split()[1]), args.concurrency,
                                       int(args.block * 500), 3, args.out / f"pa-{model}-{load.split()[1]}-{w}.csv",
                                       timeout=args.block * 5 + 60, stability_pct=60)
                            r = {**r, "client": "perf_analyzer"} if r.get("img_per_s") else {}
                        r = r or grpc_python(c.grpc_port, model, iname, crop, int(load.split()[1]), args.concurrency,
                                             args.block, args.warmup)
                except Exception as exc:  # noqa: BLE001
                    r = {"first_error": short(exc)}
                s, n = (a - b for a, b in zip(batch_metrics(c.proc.base).get(model, (0.0, 0.0)), before))
                row.img_per_s, row.p50_ms = r.get("img_per_s") or None, r.get("p50_ms")
                row.note = "; ".join(x for x in [f"model batch {s / n:.1f}" if n else "", f"{r['client']} client" if "client" in r else "",
                                                 f"{r.get('errors')} errors, {r['first_error']}" if r.get("first_error") else ""] if x)
                say(f"{model} {row.path} {load}: {row.img_per_s or 0:.0f} img/s {row.note}")
    finally:
        for c in started.values():
            c.stop()
    return rows


def phase(args: argparse.Namespace, path: str, device: str, rows) -> list[GpuRow]:
    """A whole phase that failed (a module missing, say) is a row that says why; the others still run."""
    try:
        return rows()
    except Exception as exc:  # noqa: BLE001
        return [GpuRow(args.models[0], path, device, "–", note=f"n/a: {short(exc)}")]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the CPU, a tiny model, 1 s blocks: checks the script")
    p.add_argument("--out", type=Path, help="folder for benchmarks.jsonl, gpu-bench.md and the logs (default: a temp dir)")
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
    args.cache = ROOT / ".cache" / "gpu-bench"

    info = ensure_deps(args)
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    args.out.mkdir(parents=True, exist_ok=True)
    providers = info["providers"]
    say(f"GPU: {info['gpu'] or 'none'}; onnxruntime {info.get('ort')} {providers}; missing: {sorted(info['missing'])}")
    failed = build(args.repo, args.models, args.out)
    rows = [GpuRow(m, "build", "cpu", "–", note=why) for m, why in failed.items()]
    args.models = [m for m in args.models if m not in failed]
    no_cuda = ("--cpu-smoke" if smoke else "no GPU found" if not info["gpu"] else
               "no CUDAExecutionProvider (onnxruntime-gpu not installed)" if CUDA not in providers else "")
    if "onnxruntime" not in info["missing"] and args.models:
        if not no_cuda:
            rows += phase(args, "raw ORT CUDA", "cuda", lambda: raw_rows(args, args.models, "raw ORT CUDA", args.budget * 0.45))
            first = [r for r in rows if r.path == "raw ORT CUDA" and r.model == args.models[0]]
            if all(r.note.startswith("n/a") and "time budget" not in r.note for r in first):  # listed, but it failed
                no_cuda = first[0].note[5:]
        if no_cuda:  # every row it can: the same paths on the CPU, at the batches a CPU gets through in time
            say(f"no CUDA ({no_cuda}): the rows run on the CPU")
            args.batches = [b for b in args.batches if b <= 32]
            rows = [r for r in rows if r.path != "raw ORT CUDA"] + [GpuRow(m, "raw ORT CUDA", "cuda", "–", note=f"n/a: {no_cuda}")
                                                                    for m in args.models]
            rows += phase(args, "raw ORT CPU", "cpu", lambda: raw_rows(args, args.models, "raw ORT CPU", args.budget * 0.45))
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
    bench = Bench("gpu", " ".join(["python -m benchmarks.gpu", *sys.argv[1:]]), time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  machine_info(), round(time.time() - T0, 1), smoke, settings={
                      "gpu": info["gpu"], "onnxruntime": info.get("ort"), "providers": providers, "no_cuda": no_cuda,
                      "missing": sorted(info["missing"]), "pip_failed": info.get("pip_failed", []), "block": args.block,
                      "concurrency": args.concurrency, "goal_model": (args.models or ["?"])[0],
                      "goal_path": "raw ORT CPU" if no_cuda else "raw ORT CUDA"})
    append(args.out / "benchmarks.jsonl", f"gpu {bench.date} {os.getpid()}", [bench, *rows])
    from benchmarks.report import section

    (args.out / "gpu-bench.md").write_text((text := section([bench, *rows])))
    print(text)
    say(f"wrote {args.out}/benchmarks.jsonl and gpu-bench.md (the logs beside them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
