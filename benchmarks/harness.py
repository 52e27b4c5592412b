"""What every benchmark phase shares: server subprocesses (each in its own process group), the
load generator subprocess, /proc readings, building models, the input images."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.loadgen import group_pids

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
PHOTO_SIZE = (1920, 1080)
MULTIPART_TYPE = "multipart/form-data; boundary=effnetbenchboundary7MA4YWxkTrZu0gW"  # benchmarks.peers.payloads


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(span: int = 1) -> int:
    """A free TCP port on 127.0.0.1 (the first of `span` consecutive free ones)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if span == 1 or all(_port_free(port + i) for i in range(1, span)):
            return port
    raise RuntimeError(f"no {span} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def memory_kib(pgid: int) -> dict[str, int]:
    """VmRSS and VmHWM summed over a process group: the service's supervisor, engine and front-end workers (or
    LitServe's and PyTriton's child processes). A sum of peaks: each process's own, not a moment's."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for pid in group_pids(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0])
        except OSError:
            pass
    return out


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Process:
    """A server subprocess in its own process group on a free port, waited for until `ready_path`
    answers 200; stopped with `stop_signal` to its main process, then SIGKILL to whatever is left
    of its group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, logfile: Path,
                 ready_path: str = "/health/ready", stop_signal: int = signal.SIGTERM) -> None:
        self.name, self.port, self.logfile, self.ready_path, self.stop_signal = name, port, logfile, ready_path, stop_signal
        self._log = logfile.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid  # also the process group id
        self.base = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                status, _ = http_get(self.base + self.ready_path, timeout=2.0)
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5.0
        while group_pids(self.pid) and time.monotonic() < deadline:
            time.sleep(0.2)  # children (LitServe's workers, Triton's stub) exit after their parent
        if group_pids(self.pid):
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


def loadgen(url: str, body: Path, concurrency: int, duration: float, warmup: float, grace: float, *,
            content_type: str = "image/jpeg", headers: list[str] | None = None, server_pgid: int | None = None,
            threads: bool = False) -> dict:
    """benchmarks.loadgen in its own process; server CPU over the window from the server's process group."""
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--body", str(body), "--content-type", content_type,
           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup), "--grace", str(grace)]
    for h in headers or []:
        cmd += ["--header", h]
    if server_pgid:
        cmd += ["--server-pgid", str(server_pgid)] + ["--server-threads"] * threads
    r = subprocess.run(cmd, env=python_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=duration + warmup + grace + 120)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def batch_metrics(base: str) -> dict[str, tuple[float, float]]:
    """model -> (sum, count) of the service's effnet_batch_size histogram."""
    _, text = http_get(base + "/metrics")
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^effnet_batch_size_(sum|count)\{[^}]*model="([^"]+)"[^}]*\}\s+(\S+)$', text, re.M):
        kind, model, value = m.groups()
        out.setdefault(model, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its children (the servers, the clients), to tell others' load apart."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# --- models and inputs ------------------------------------------------------------------
def has_model(repo: Path, name: str) -> bool:
    return (repo / name / "manifest.json").is_file() and (repo / name / "model.onnx").is_file()


def build_args(name: str) -> list[str]:
    if name in QUICK_MODELS:
        return QUICK_MODELS[name] + ["--name", name, "--weights", "random"]
    return ["--models", name, "--weights", "random"]


def build_models(repo: Path, names: list[str], allow_build: bool) -> float:
    missing = [n for n in names if not has_model(repo, n)]
    if not missing:
        return 0.0
    if not allow_build:
        raise SystemExit(f"models missing from {repo}: {', '.join(missing)} (run without --no-build)")
    log(f"building {','.join(missing)} into {repo} (one-time; not part of the measured run)")
    t0 = time.perf_counter()
    for n in missing:
        subprocess.run([sys.executable, "-m", "effnet_serve", "build", *build_args(n), "--repo", str(repo), "--quiet"],
                       env=python_env(), cwd=ROOT, check=True)
    return time.perf_counter() - t0


def write_photo(path: Path) -> Path:
    """The benchmark's real-case input: a real photo (scikit-image's chelsea) as a 1920x1080 JPEG, quality 90."""
    from PIL import Image
    from skimage import data as skdata

    Image.fromarray(skdata.chelsea()).resize(PHOTO_SIZE, Image.Resampling.LANCZOS).save(path, quality=90)
    return path


def make_inputs(work: Path, models: list[str], manifests: dict[str, dict]) -> dict[str, Path]:
    """The photo (1920x1080, quality 90) and a JPEG at each model's crop (benchmarks.blocks.jpeg), plus each as the
    multipart body the peers get (key `<name>:multipart`)."""
    from benchmarks.blocks import jpeg

    paths = {}
    for key, image in [("photo", "photo"), *((m, f"{manifests[m]['preprocess']['crop']}px") for m in models)]:
        paths[key], paths[f"{key}:multipart"] = jpeg(work, image)
    return paths
