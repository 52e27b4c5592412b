"""`effnet serve` with EFFNET_WORKERS=2 as real processes: a supervisor, one engine, two workers on shared
ports. Each kind of process is killed under load: a killed worker is replaced and only its own requests
fail; a killed engine makes the service exit non-zero (to be restarted whole); SIGTERM drains and exits 0.
No shared memory is left behind in any case."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving_helpers import encode, photo, write_model

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, repo: Path, prefix: tuple[str, ...] = (), **env: str) -> None:
        """`prefix`: a command the service runs under (a new PID namespace, say)."""
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ, "EFFNET_REPOSITORY": str(repo), "EFFNET_MODELS": "fake", "EFFNET_DEFAULT_MODEL": "fake",
            "EFFNET_WORKERS": "2", "EFFNET_GRPC_PORT": str(self.grpc_port), "EFFNET_SHM_MB": "16",
            "EFFNET_THREADS": "1", "EFFNET_DECODE_WORKERS": "1", "EFFNET_DRAIN_S": "5", "EFFNET_ACCESS_LOG": "false",
            "PYTHONPATH": str(ROOT), **env,
        }
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "effnet_serve", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.log
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log
            time.sleep(0.1)

    def pids(self, kind: str) -> list[int]:
        """Process ids the supervisor logged for `engine` or `worker` (the latest start of each worker)."""
        if kind == "engine":
            return [int(m) for m in re.findall(r"engine process started \(pid (\d+)\)", self.log)]
        workers: dict[str, int] = {}
        for i, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.log):
            workers[i] = int(pid)
        return list(workers.values())

    def eventually(self, check, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log
            time.sleep(0.05)

    def segments(self) -> list[str]:
        """This service's arenas (named after its pid and a token: engine/link/shm.py)."""
        return sorted(p.name for p in Path("/dev/shm").glob(f"effnet-shm-{self.proc.pid}.*"))

    def mark(self) -> list[str]:
        """The file whose flock says this service lives (while it does; a clean stop removes it)."""
        return sorted(p.name for p in Path("/dev/shm").glob(f"effnet-live-{self.proc.pid}.*"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# The service as pid 1 of a new PID namespace, as a container without an init runs it, with its own /dev/shm.
IN_A_CONTAINER = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--mount-proc", "--kill-child",
                  "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"')


def namespaces_allowed() -> bool:
    try:
        return subprocess.run([*IN_A_CONTAINER[:8], "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path / "repo", "fake", crop=32, resize=36)
    return tmp_path / "repo"


class Load:
    """Four clients sending one JPEG each, back to back, each on a new connection; their statuses in order."""

    def __init__(self, url: str, data: bytes, clients: int = 4) -> None:
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url, data)) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, url: str, data: bytes) -> None:
        while not self._stop.is_set():
            self.statuses.append(_classify(url, data))

    def stop(self) -> bool:
        """Stop the clients; False if one is still stuck after its request's own 30 s timeout."""
        self._stop.set()
        for t in self._threads:
            t.join(40)
        return not any(t.is_alive() for t in self._threads)


def _classify(url: str, data: bytes) -> int:
    try:
        return httpx.post(url + "/classify", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=30).status_code
    except httpx.TransportError:
        return 0  # the connection was on the worker that was killed


def test_two_workers_serve_http_and_grpc_and_a_killed_worker_is_replaced(repo):
    import tritonclient.grpc as grpcclient

    svc = Service(repo)
    try:
        svc.wait_ready()
        assert len(svc.pids("worker")) == 2
        svc.eventually(lambda: len(svc.segments()) == 2)  # each worker made its arena (one may still start)
        jpeg = encode(photo((96, 72), seed=5))
        first = httpx.post(svc.url + "/classify?top_k=3", files={"file": ("x.jpg", jpeg, "image/jpeg")}, timeout=30)
        assert first.status_code == 200, first.text
        assert len(first.headers["X-Effnet-Model-Version"]) == 12 and len(first.json()["results"][0]["predictions"]) == 3

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{svc.grpc_port}")
        x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
        inp = grpcclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        logits = client.infer("fake", [inp]).as_numpy("logits")
        assert logits.shape == (2, 1000) and client.is_server_ready()

        victim = svc.pids("worker")[0]
        load = Load(svc.url, jpeg)
        statuses = load.statuses
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (len(svc.pids("worker")) == 2 and victim not in svc.pids("worker")):
            assert time.monotonic() < deadline, svc.log
            time.sleep(0.1)
        svc.wait_ready()
        n_after = len(statuses)
        deadline = time.monotonic() + 30
        while len(statuses) < n_after + 20:  # the service keeps answering after the replacement
            assert time.monotonic() < deadline and svc.proc.poll() is None, svc.log
            time.sleep(0.05)
        assert load.stop(), "a request hung"
        # Only the dead worker's own connections failed (0); everyone else got a 200; nothing else.
        assert set(statuses) <= {200, 0}, sorted(set(statuses))
        assert statuses[-10:] == [200] * 10
        svc.eventually(lambda: len(svc.segments()) == 2)
        assert not [s for s in svc.segments() if s.endswith(f"-{victim}")], svc.log

        metrics = httpx.get(svc.url + "/metrics", timeout=10).text  # one /metrics for the whole service
        ok = float(re.search(r'effnet_requests_total\{model="fake",status="200"\} (\S+)', metrics).group(1))
        assert ok >= statuses.count(200) + 2  # every answer, whichever worker gave it (+ the first and gRPC)

        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(60) == 0, svc.log
        assert svc.segments() == [] and svc.mark() == []
    finally:
        svc.stop()


def test_a_killed_engine_under_load_fails_requests_cleanly_and_the_service_exits_non_zero(repo):
    """Killed mid-load: every request still gets an answer (200 before, 503 once the link is gone) or a closed
    connection as the service stops; none hangs; the service exits 1 so that it is restarted whole."""
    svc = Service(repo)
    try:
        svc.wait_ready()
        load = Load(svc.url, encode(photo((64, 48), seed=9)))
        statuses = load.statuses
        svc.eventually(lambda: statuses.count(200) >= 20)
        (engine,) = svc.pids("engine")
        os.kill(engine, signal.SIGKILL)
        assert svc.proc.wait(60) == 1, svc.log
        assert load.stop(), "a request hung"
        assert set(statuses) <= {200, 503, 0}, sorted(set(statuses))
        assert "the engine process died" in svc.log
        assert svc.segments() == [] and svc.mark() == []
    finally:
        svc.stop()


def test_too_little_shared_memory_is_refused_with_what_to_set(repo):
    svc = Service(repo, EFFNET_SHM_MB="65536", EFFNET_WORKERS="64")
    try:
        assert svc.proc.wait(60) == 2, svc.log
        assert "shm_size" in svc.log and "EFFNET_SHM_MB" in svc.log
    finally:
        svc.stop()


def test_no_process_outlives_a_killed_supervisor(repo):
    svc = Service(repo)
    try:
        svc.wait_ready()
        svc.eventually(lambda: len(svc.segments()) == 2 and len(svc.mark()) == 1)
        children = svc.pids("engine") + svc.pids("worker")
        svc.proc.kill()
        svc.proc.wait(10)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in children) or svc.segments():
            assert time.monotonic() < deadline, (children, svc.segments())
            time.sleep(0.1)
    finally:
        svc.stop()


def _alive(pid: int) -> bool:
    return _state(pid) not in ("gone", "Z")  # a zombie (exited, not yet reaped) is gone for our purpose


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except FileNotFoundError:
            pass
    return kids


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # FileNotFoundError, or ESRCH for a process that ends while it is read
        return "gone"


def test_arenas_shrink_to_a_small_dev_shm_unless_their_size_was_set():
    from effnet_serve.core.config import Settings
    from effnet_serve.supervisor import arena_bytes

    mb = 1 << 20
    assert arena_bytes(Settings(workers=2), 10_000 * mb) == 256 * mb  # room enough: the default
    assert arena_bytes(Settings(workers=2), None) == 256 * mb  # no /dev/shm to ask
    assert arena_bytes(Settings(workers=2), 64 * mb) == 25 * mb  # Docker's 64 MB: 80% shared, whole MB
    with pytest.raises(ValueError, match="EFFNET_SHM_MB=256 need 512 MB"):
        arena_bytes(Settings(workers=2, shm_mb=256), 64 * mb)  # set on purpose: not second-guessed
    with pytest.raises(ValueError, match="under 8 MB"):
        arena_bytes(Settings(workers=16), 64 * mb)


def test_a_sigterm_while_workers_start_still_stops_the_service_at_once(repo):
    """The signal can reach a worker before uvicorn listens for it: it must still drain and exit, not be lost
    (the service would then wait for the engine's drain deadline with a worker still serving)."""
    svc = Service(repo, EFFNET_DRAIN_S="20")
    try:
        svc.eventually(lambda: len(svc.pids("worker")) == 2, timeout_s=60)
        started = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(60) == 0, svc.log
        assert time.monotonic() - started < 15, svc.log  # well inside the 20 s drain: nobody waited it out
        assert svc.segments() == []
    finally:
        svc.stop()


def _die_with_parent(supervisor_pid: int) -> None:
    from effnet_serve.core.lifetime import die_with_parent
    die_with_parent(supervisor_pid)


@pytest.mark.parametrize("parent", ["alive", "gone"])
def test_a_child_lives_while_its_supervisor_does_and_ends_when_it_is_gone(parent):
    """die_with_parent asks the kernel for a SIGTERM at the supervisor's death; one that already happened shows
    as another parent pid. Compared with the supervisor's own pid, not with 1, which is what a live supervisor
    is in a container without an init."""
    import multiprocessing as mp

    supervisor = os.getpid() if parent == "alive" else os.getpid() + 1_000_000  # no process has that pid
    child = mp.get_context("spawn").Process(target=_die_with_parent, args=(supervisor,))
    child.start()
    child.join(60)
    assert child.exitcode == (0 if parent == "alive" else -signal.SIGTERM)


@pytest.mark.skipif(not namespaces_allowed(), reason="this machine allows no user and PID namespaces")
def test_the_service_starts_serves_and_stops_as_pid_1(repo):
    """The image's exec-form ENTRYPOINT makes the supervisor pid 1 in Kubernetes, KServe or `docker run` without
    --init. Its children once took their parent pid of 1 for a dead supervisor and killed themselves: the service
    never started (the engine "did not start", exit 1)."""
    svc = Service(repo, prefix=IN_A_CONTAINER)
    try:
        svc.wait_ready()
        assert _classify(svc.url, encode(photo((50, 40)))) == 200
        # To the supervisor (pid 1 in there; unshare, its parent out here, passes no signal on), as a container
        # runtime's stop does: it drains, and unshare exits with its status.
        (supervisor,) = _children(svc.proc.pid)
        os.kill(supervisor, signal.SIGTERM)
        assert svc.proc.wait(30) == 0, svc.log
    finally:
        svc.stop()


def _die_holding_the_lock(table, held) -> None:
    """A worker the OOM killer catches inside a charge to the shared budget."""
    lock = table.lock()
    lock.__enter__()
    held.set()
    time.sleep(120)


def test_a_worker_killed_while_it_holds_the_budgets_lock_does_not_hang_the_others(tmp_path):
    """The workers' shared counts (the memory budget, the uploads) have one lock. A semaphore held by a process
    the OOM killer ended stayed held for good: the supervisor's restart and every other worker's next charge
    waited on it for ever. The kernel lets go of a dead process's flock."""
    import multiprocessing as mp

    from effnet_serve.engine.memory import SharedBudget, SharedUploadCount, SlotTable

    ctx = mp.get_context("spawn")
    budget = SlotTable(ctx, 2, str(tmp_path / "budget.lock"))
    uploads = SlotTable(ctx, 2, str(tmp_path / "uploads.lock"))
    held = ctx.Event()
    victim = ctx.Process(target=_die_holding_the_lock, args=(budget, held))
    victim.start()
    try:
        assert held.wait(60)
        budget.values[0] = 5000  # what it held
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
    finally:
        if victim.is_alive():
            victim.kill()

    def returns(fn) -> bool:
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        t.join(10)
        return not t.is_alive()

    assert returns(lambda: SharedBudget.clear(budget, 0)), "the supervisor's restart waits on a dead worker's lock"
    survivor = SharedBudget(1 << 20, budget, 1)
    assert returns(lambda: survivor.take(65536, "a body")), "the other worker's next charge waits for ever"
    assert list(budget.values) == [0, 65536]
    assert SharedUploadCount(8, uploads, 1).try_take()


def test_sigterm_while_the_engine_starts_is_a_clean_stop(repo):
    """A SIGTERM (or Ctrl-C) before the service is ready, while the engine still imports and loads: exit 0, as
    any SIGTERM. The engine may die of it before its own handler is in place; that is no failed start."""
    svc = Service(repo)
    try:
        deadline = time.monotonic() + 60
        while "engine process started" not in svc.log:
            assert time.monotonic() < deadline and svc.proc.poll() is None, svc.log
            time.sleep(0.005)
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(60) == 0, svc.log
        assert "did not start" not in svc.log
    finally:
        svc.stop()


def test_segments_of_services_that_are_gone_are_reclaimed_and_a_live_ones_kept_whatever_its_pid(tmp_path):
    """Whether a service runs is its mark's flock, not its pid: a pid may be another process's in another PID
    namespace sharing /dev/shm, or this very supervisor's after a container restart (pid 1 again)."""
    from effnet_serve.engine.link import shm

    elsewhere = f"{2 ** 22 + 12345}.{'a' * 12}"  # a pid nobody has here: another namespace's live service
    live = shm.ServiceMark(elsewhere, tmp_path)
    crashed = f"{os.getpid()}.{'b' * 12}"  # this pid, an earlier start (a container restarted with /dev/shm kept)
    (tmp_path / f"effnet-live-{crashed}").write_bytes(b"")  # its mark, locked by nobody now
    unmarked = f"77.{'c' * 12}"  # segments without a mark at all (removed by hand, say)
    names = [shm.segment_name(s, w) for s in (elsewhere, crashed, unmarked) for w in (7, 8)]
    for name in [*names, "effnet-shm-test123-4", "effnet-shm-notapid-1"]:
        (tmp_path / name).write_bytes(b"x")
    try:
        gone = shm.reclaim(tmp_path)
        assert gone == sorted(names[2:])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [*names[:2], f"effnet-live-{elsewhere}", "effnet-shm-test123-4", "effnet-shm-notapid-1"])
    finally:
        live.close()
    assert shm.reclaim(tmp_path) == sorted(names[:2])  # once its service is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["effnet-shm-notapid-1", "effnet-shm-test123-4"]


def test_a_request_still_uploading_at_sigterm_is_served(repo):
    """Its headers in, half its body sent, then SIGTERM: it was in flight, and is answered 200 within the drain,
    as one process answers it. (A worker asks the engine for admission only once the body is in, by then
    draining: the engine admits what arrived before its drain began.)"""
    import socket as sockets

    svc = Service(repo, EFFNET_MIN_UPLOAD_KBPS="0", EFFNET_BODY_TIMEOUT_S="60")
    try:
        svc.wait_ready()
        svc.eventually(lambda: len(svc.pids("worker")) == 2)
        body = encode(photo((96, 72), seed=2))
        head = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        with sockets.create_connection(("127.0.0.1", svc.port), timeout=30) as s:
            s.sendall(head + body[: len(body) // 2])
            time.sleep(0.5)  # in a worker, its body half read
            svc.proc.send_signal(signal.SIGTERM)
            svc.eventually(lambda: "draining every process" in svc.log, timeout_s=10)
            time.sleep(0.5)  # the engine has begun its drain
            s.sendall(body[len(body) // 2:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert svc.proc.wait(60) == 0, svc.log
    finally:
        svc.stop()


def test_run_folders_of_services_that_are_gone_are_removed_and_a_live_ones_kept(tmp_path):
    """A SIGKILLed supervisor leaves its run folder (the engine's socket, the lock files) in /tmp; the next start
    removes those whose service holds no mark, and nothing else."""
    from effnet_serve.engine.link import shm
    from effnet_serve.supervisor import reclaim_run_dirs

    tmp, shm_dir = tmp_path / "tmp", tmp_path / "shm"
    tmp.mkdir()
    shm_dir.mkdir()
    live_id, dead_id = f"12.{'a' * 12}", f"13.{'b' * 12}"
    live = shm.ServiceMark(live_id, shm_dir)
    try:
        for name in (f"effnet-{live_id}-x1", f"effnet-{dead_id}-x2", "effnet-k3w9", "effnet-test-x"):
            (tmp / name).mkdir()
            (tmp / name / "engine.sock").write_bytes(b"")
        (tmp / f"effnet-{dead_id}-file").write_bytes(b"")  # not a folder: not ours
        assert reclaim_run_dirs(tmp, shm_dir) == [f"effnet-{dead_id}-x2"]
        assert sorted(p.name for p in tmp.iterdir()) == sorted(
            [f"effnet-{live_id}-x1", "effnet-k3w9", "effnet-test-x", f"effnet-{dead_id}-file"])
    finally:
        live.close()
    assert reclaim_run_dirs(tmp, shm_dir) == [f"effnet-{live_id}-x1"]


def _end_link_to_engine(worker_pid: int) -> bool | None:
    """Shut down, from out here, the worker's socket connected to the engine (a copy of its descriptor through
    pidfd_getfd, Linux 5.6): both ends see the link end while both processes live. False: no such socket (yet);
    None: this machine does not allow the copy."""
    import ctypes
    import errno
    import socket as sockets

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd_getfd = 438  # x86_64 and aarch64 alike
    try:
        pidfd = os.pidfd_open(worker_pid)
    except OSError:
        return None
    try:
        for fd in os.listdir(f"/proc/{worker_pid}/fd"):
            try:
                if not os.readlink(f"/proc/{worker_pid}/fd/{fd}").startswith("socket:"):
                    continue
            except FileNotFoundError:  # closed since it was listed
                continue
            copy = libc.syscall(pidfd_getfd, pidfd, int(fd), 0)
            if copy < 0:
                if ctypes.get_errno() == errno.EBADF:  # closed since it was listed
                    continue
                return None
            s = sockets.socket(fileno=copy)
            try:
                if s.family == sockets.AF_UNIX and str(s.getpeername()).endswith("engine.sock"):
                    s.shutdown(sockets.SHUT_RDWR)
                    return True
            except OSError:
                pass
            finally:
                s.close()
    finally:
        os.close(pidfd)
    return False


def test_a_worker_whose_link_to_a_live_engine_ends_is_replaced(repo):
    """The engine ends a worker's link and goes on (a malformed message, say): that worker once answered 503
    for good beside healthy ones, its readiness too. It stops, and the supervisor starts another."""
    svc = Service(repo)
    try:
        svc.wait_ready()
        svc.eventually(lambda: len(svc.pids("worker")) == 2)
        victim = svc.pids("worker")[0]
        ended = _end_link_to_engine(victim)
        deadline = time.monotonic() + 30
        while ended is False and time.monotonic() < deadline:  # ready through the other worker: still connecting
            time.sleep(0.1)
            ended = _end_link_to_engine(victim)
        if ended is None:
            pytest.skip("this machine lets no process copy another's descriptor (pidfd_getfd)")
        assert ended, f"worker {victim} never connected to the engine:\n{svc.log}"
        svc.eventually(lambda: victim not in svc.pids("worker") and len(svc.pids("worker")) == 2)
        assert "stopping this worker, to be started again" in svc.log
        (engine,) = svc.pids("engine")
        assert _alive(engine)
        data = encode(photo((50, 40)))
        statuses = [_classify(svc.url, data) for _ in range(20)]  # new connections reach both workers
        assert statuses == [200] * 20, statuses
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(60) == 0, svc.log
    finally:
        svc.stop()


@pytest.mark.skipif(not namespaces_allowed(), reason="this machine allows no user and PID namespaces")
def test_as_pid_1_the_orphans_of_a_killed_worker_are_reaped(repo):
    """Pid 1 inherits every orphan of its container: a killed worker's JSON parser (which ends with it) and
    resource tracker become its children, and stay zombies, each holding a pid, unless it reaps them."""
    import json

    svc = Service(repo, prefix=IN_A_CONTAINER)
    try:
        svc.wait_ready()
        (supervisor,) = _children(svc.proc.pid)
        x = np.zeros((24, 3, 32, 32), np.float32)
        body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.tolist()}]}).encode()  # over 256 kB: parsed in a parser process
        deadline = time.monotonic() + 60
        while not any(_children(w) for w in _children(supervisor)):
            assert time.monotonic() < deadline, svc.log
            r = httpx.post(svc.url + "/v2/models/fake/infer", content=body, timeout=30,
                           headers={"Content-Type": "application/json"})  # a new connection: either worker
            assert r.status_code == 200, r.text
        victim = next(w for w in _children(supervisor) if _children(w))
        orphans = _children(victim)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            zombies = [p for p in _children(supervisor) if _state(p) == "Z"]
            left = [p for p in orphans if _alive(p)]
            if not zombies and not left:
                break
            assert time.monotonic() < deadline, f"zombies {zombies}, orphans alive {left}\n{svc.log}"
            time.sleep(0.2)
        svc.eventually(lambda: _classify(svc.url, encode(photo((50, 40)))) == 200)
    finally:
        svc.stop()
