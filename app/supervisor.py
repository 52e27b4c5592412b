"""`effnet serve`: one process (EFFNET_WORKERS=1), or a supervisor over one engine process and N front-end
worker processes.

    supervisor (this module)      holds the ports, starts, watches and stops the others
      engine (app/engine/link/process.py)     ORT sessions, batchers, queue room, model control, /metrics
      worker x N (app/api/server.py)          HTTP + gRPC on shared ports, bodies, decode, answers
                                              -> the engine over a Unix socket, tensors in shared memory

Faults:
* a worker that dies is started again; the engine gives back what it held (its requests end as 499) and
  the supervisor unlinks its shared memory; nobody else's request is touched;
* if the engine dies, the workers answer 503 at once (readiness too), and the supervisor stops them and
  exits 1, so that the orchestrator (Kubernetes, compose's restart policy) restarts the service whole:
  models are loaded in one place only, and a half-restarted service would serve from an empty engine;
* SIGTERM/SIGINT: every process drains (readiness 503 at once, requests in flight finish within
  EFFNET_DRAIN_S) and the supervisor exits 0.

Processes are started with `spawn`, never `fork`: ONNX Runtime and CUDA do not survive a fork.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

from .api.server import serve as serve_one_process
from .api.server import reuseport_socket, serve_worker
from .core.config import Settings
from .core.lifetime import die_with_parent
from .engine.link import shm
from .engine.link.process import run_engine
from .engine.memory import SharedBudget, SharedUploadCount, SlotTable

log = logging.getLogger("effnet.supervisor")

ENGINE_START_S = 60.0  # the engine answers on its socket this soon (models load after, in the background)
RESTARTS_PER_MINUTE = 10  # more worker deaths than this in a minute: something is wrong, stop


def serve(host: str, port: int) -> int:
    settings = Settings()
    if settings.workers == 1:
        return serve_one_process(host, port)
    return Supervisor(settings, host, port).run()


def hold_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) the port the workers will share: a port taken by someone else fails here, clearly,
    and port 0 becomes a real port the workers then bind too."""
    return reuseport_socket(host, port)


MIN_ARENA = 8 << 20  # one B7 image (4.3 MB) and its logits, with room to spare
SHM_HOW = ("give the container more /dev/shm (docker run --shm-size, compose shm_size; Kubernetes: an emptyDir "
           "with medium: Memory mounted on /dev/shm) or lower EFFNET_WORKERS")


def arena_bytes(settings: Settings, free: int | None) -> int:
    """Each worker's shared-memory arena: EFFNET_SHM_MB, or, when that was not set and /dev/shm is smaller
    than workers x the default (Docker gives 64 MB), an equal share of 80% of what is free, with a warning.
    ValueError (what to set) when an explicit EFFNET_SHM_MB does not fit, or a share would be under 8 MB."""
    want = settings.shm_mb << 20
    if free is None or free >= settings.workers * want:
        return want
    if "shm_mb" in settings.model_fields_set:
        raise ValueError(f"/dev/shm has {free >> 20} MB free; {settings.workers} workers x EFFNET_SHM_MB="
                         f"{settings.shm_mb} need {(settings.workers * want) >> 20} MB: {SHM_HOW}, or lower EFFNET_SHM_MB")
    share = int(free * 0.8) // settings.workers // ALIGN_MB * ALIGN_MB
    if share < MIN_ARENA:
        raise ValueError(f"/dev/shm has {free >> 20} MB free: under {MIN_ARENA >> 20} MB for each of "
                         f"{settings.workers} workers; {SHM_HOW}")
    log.warning("/dev/shm has %d MB free: each of %d workers gets %d MB of shared memory instead of %d "
                "(EFFNET_SHM_MB); a request whose tensors do not fit in it is refused with 503. To lift it, %s",
                free >> 20, settings.workers, share >> 20, settings.shm_mb, SHM_HOW)
    return share


ALIGN_MB = 1 << 20


def shm_free_bytes(path: Path = shm.SHM_DIR) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


_RUN_DIR = re.compile(rf"^effnet-({shm.SERVICE_ID})-")


def reclaim_run_dirs(tmp: Path, shm_dir: Path = shm.SHM_DIR) -> list[str]:
    """Remove the run folders (the engine's socket, the shared counts' lock files) of services that are gone:
    a SIGKILLed supervisor leaves its folder behind. Judged by the service's mark (engine/link/shm.py)."""
    gone = []
    for path in tmp.glob("effnet-*"):
        m = _RUN_DIR.match(path.name)
        if m and path.is_dir() and shm.service_gone(m.group(1), shm_dir):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path.name)
    return sorted(gone)


def reap_orphans(own: set[int | None]) -> list[int]:
    """As pid 1 (a container without an init) the supervisor inherits every orphan in the container: a killed
    worker's JSON parser process, its resource tracker. Those that have exited stay zombies, each holding a pid
    (the container's pids limit) for the container's life, unless reaped here. Its own children (`own`) are
    left to multiprocessing, which reaps them itself."""
    me = os.getpid()
    reaped: list[int] = []
    if os.readlink("/proc/self") != str(me):
        return reaped  # a /proc of another PID namespace (not mounted for this one): its pids are not ours
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            state, ppid = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state == "Z" and int(ppid) == me:
            try:
                os.waitpid(int(entry.name), os.WNOHANG)
                reaped.append(int(entry.name))
            except ChildProcessError:
                pass
    return reaped


class Supervisor:
    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings, self.host, self.port = settings, host, port
        self.ctx = mp.get_context("spawn")
        self.stopping = False
        self.workers: dict[int, mp.process.BaseProcess] = {}
        self.restarts: list[float] = []
        self._terminated: set[int] = set()  # children already sent SIGTERM

    def run(self) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        s = self.settings
        for name in shm.reclaim():
            log.warning("removed shared memory %s left by a service that is gone", name)
        for name in reclaim_run_dirs(Path(tempfile.gettempdir())):
            log.warning("removed %s left by a service that is gone", name)
        self.service = shm.service_id()  # in its segments' names; the mark says it lives (engine/link/shm.py)
        try:
            self.arena_bytes = arena_bytes(s, shm_free_bytes())
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        try:
            holders = [hold_port(self.host, self.port)]
            self.port = holders[0].getsockname()[1]
            if s.grpc_port:
                holders.append(hold_port(s.grpc_host or self.host, s.grpc_port))
        except OSError as exc:
            log.error("cannot listen on %s: %s", self.host, exc)
            return 1
        # Marked alive before anything named after it exists: a start beside this one must not take it for gone.
        mark = shm.ServiceMark(self.service)
        # 0700: only this user can reach the engine's socket. Named after the service, so that a start after a
        # SIGKILL can tell it is left over (reclaim_run_dirs).
        rundir = tempfile.mkdtemp(prefix=f"effnet-{self.service}-")
        self.socket_path = os.path.join(rundir, "engine.sock")
        # Each worker's bytes held against EFFNET_MAX_INFLIGHT_MB (memory.SharedBudget), and its uploads in
        # progress (SharedUploadCount): one slot per worker, one lock for all.
        self.budget_slots = SlotTable(self.ctx, s.workers, os.path.join(rundir, "budget.lock"))
        self.upload_slots = SlotTable(self.ctx, s.workers, os.path.join(rundir, "uploads.lock"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            return self._supervise()
        finally:
            for h in holders:
                h.close()
            shutil.rmtree(rundir, ignore_errors=True)
            mark.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stopping:
            log.info("signal %d: draining every process (up to %g s)", signum, self.settings.drain_s)
        self.stopping = True
        self._terminate_all()  # at once: a request arriving a moment later must already be refused

    def _terminate_all(self) -> None:
        """SIGTERM to every child, once: the workers stop accepting and drain, the engine refuses new work."""
        for p in [*self.workers.values(), getattr(self, "engine", None)]:
            if p is not None and p.pid is not None and p.pid not in self._terminated and p.is_alive():
                self._terminated.add(p.pid)
                p.terminate()

    def _supervise(self) -> int:
        ready_rx, ready_tx = self.ctx.Pipe(duplex=False)
        self.engine = self.ctx.Process(target=_engine_main, args=(self.socket_path, ready_tx, os.getpid()),
                                       name="effnet-engine")
        self.engine.start()
        log.info("engine process started (pid %d)", self.engine.pid)
        ready_tx.close()
        started = ready_rx.poll(ENGINE_START_S) and self._recv(ready_rx) == "ready"
        if self.stopping:  # told to stop while the engine started (which a SIGTERM before its handler is in
            self._stop_all()  # place kills): a clean stop, not a failed start
            log.info("stopped before the service was ready")
            return 0
        if not started:
            log.error("the engine process did not start (exit code %s)", self.engine.exitcode)
            self._stop_all()
            return 1
        for i in range(self.settings.workers):
            self._start_worker(i)
        log.info("serving on %s:%d with %d workers over one engine (pid %d)", self.host, self.port,
                 self.settings.workers, self.engine.pid)
        code = 0
        while not self.stopping:
            wait([self.engine.sentinel, *(w.sentinel for w in self.workers.values())], timeout=0.5)
            if self.stopping:
                break
            if not self.engine.is_alive():
                log.error("the engine process died (exit code %s): stopping the service so that it is restarted whole",
                          self.engine.exitcode)
                code = 1
                break
            for i, w in list(self.workers.items()):
                if not w.is_alive() and w.pid is not None:
                    shm.unlink(shm.segment_name(self.service, w.pid))
                    if not self._may_restart():
                        log.error("workers keep dying (%d in a minute): stopping", len(self.restarts))
                        code = 1
                        break
                    log.error("worker %d (pid %d) died (exit code %s); starting another", i, w.pid, w.exitcode)
                    self._start_worker(i)
            if code:
                break
            if os.getpid() == 1:
                reap_orphans({self.engine.pid, *(w.pid for w in self.workers.values())})
        self._stop_all()
        return code

    @staticmethod
    def _recv(conn) -> object:
        try:
            return conn.recv()
        except EOFError:
            return None

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60.0] + [now]
        return len(self.restarts) <= RESTARTS_PER_MINUTE

    def _start_worker(self, i: int) -> None:
        SharedBudget.clear(self.budget_slots, i)  # what a dead predecessor held is not held any more
        SharedUploadCount.clear(self.upload_slots, i)
        w = self.ctx.Process(
            target=_worker_main, name=f"effnet-worker-{i}",
            args=(self.host, self.port, self.socket_path, os.getpid(), self.service, self.settings.workers,
                  self.budget_slots, self.upload_slots, i, self.arena_bytes),
        )
        w.start()
        log.info("worker %d started (pid %d)", i, w.pid)
        self.workers[i] = w

    def _stop_all(self) -> None:
        """Workers drain first (they hold the clients); the engine serves them until they are gone."""
        grace = self.settings.drain_s + 10.0
        self._terminate_all()
        deadline = time.monotonic() + grace
        for p in [*self.workers.values(), self.engine]:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("%s did not stop within %g s: killed", p.name, grace)
                p.kill()
                p.join(5.0)
        for w in self.workers.values():
            if w.pid is not None:
                shm.unlink(shm.segment_name(self.service, w.pid))


def _worker_main(host: str, port: int, socket_path: str, supervisor_pid: int, service: str, workers: int,
                 budget_slots, upload_slots, index: int, arena_bytes: int) -> None:
    die_with_parent(supervisor_pid)
    serve_worker(host, port, socket_path, shm.segment_name(service, os.getpid()), arena_bytes, workers,
                 budget_slots, upload_slots, index)


def _engine_main(socket_path: str, ready, supervisor_pid: int) -> None:
    die_with_parent(supervisor_pid)
    run_engine(socket_path, ready)
