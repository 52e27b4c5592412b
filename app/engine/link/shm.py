"""Shared memory between a worker and the engine: one arena per worker, created and unlinked by it.

The worker writes each preprocessed image into its arena and sends the engine only (offset, shape); the
engine reads the tensor where it lies (the batcher copies it into the batch) and writes the logits back
into space the worker set aside beside it. So pixels never go through a pipe or pickle.

Lessons from other servers (see ../shared/notes/multiprocess.md), each handled here:
* segment names carry the service's id (its PID and a random token) and the worker's PID, so no process
  can mistake another worker's arena for its own, and a later start can reclaim the segments of a service
  that was SIGKILLed (`reclaim`). Whether a service still runs is not read from its PID, which another
  PID namespace sharing /dev/shm (hostIPC, one emptyDir for two containers) or a restarted container (pid 1
  again) gives to another process: each service holds an flock on a mark file beside its segments for as
  long as it lives (`ServiceMark`), and the kernel lets go of it however the service dies;
* multiprocessing's resource tracker is told to forget every segment (it would unlink segments other
  processes still map, and warn about them at exit): the creating worker unlinks its arena itself, and the
  supervisor unlinks the arena of a worker that died;
* space is handed out first-fit and given back when the engine has answered for it, never earlier: the
  engine may still be reading a tensor whose request the client abandoned.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import threading

import _posixshmem  # the C module multiprocessing.shared_memory unlinks with
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

PREFIX = "effnet-shm"
MARK = "effnet-live"  # + the service id: the file whose flock says the service is alive
ALIGN = 64  # bytes: each tensor starts on a cache line
SHM_DIR = Path("/dev/shm")
SERVICE_ID = r"\d+\.[0-9a-f]+"  # service_id()'s form, in the names of what a service leaves in shared folders
_SERVICE_SEGMENT = re.compile(rf"^{PREFIX}-({SERVICE_ID})-\d+$")  # what reclaim judges (nothing else)


def service_id() -> str:
    """This service's part of its segments' names: its PID, and a token no other start shares."""
    return f"{os.getpid()}.{secrets.token_hex(6)}"


def segment_name(service: str, worker_pid: int) -> str:
    return f"{PREFIX}-{service}-{worker_pid}"


class ServiceMark:
    """The supervisor's flock on `effnet-live-<service id>` in the shared-memory folder, held while it lives."""

    def __init__(self, service: str, shm_dir: Path = SHM_DIR) -> None:
        self.path = shm_dir / f"{MARK}-{service}"
        # Locked before it takes its name, so no reclaim ever sees the mark unlocked (and takes it for a dead one).
        hidden = shm_dir / f".{MARK}-{service}"
        self._fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(hidden, self.path)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


def float32_view(shm: SharedMemory, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array of `shape` at `offset` in `shm`, where it lies. np.frombuffer holds a buffer export on
    the mapping for as long as the array (or a view of it) lives, so `shm.close()` raises BufferError until then;
    np.ndarray(buffer=shm.buf) holds none with numpy 2, and a close would leave the array on unmapped memory
    (the engine then dies of SIGSEGV as soon as it touches it)."""
    buf = shm.buf
    assert buf is not None  # only closed mappings have none, and none of ours is used once closed
    return np.frombuffer(buf, np.float32, int(np.prod(shape)), offset).reshape(shape)


def _forget(shm: SharedMemory) -> None:
    """Keep multiprocessing's resource tracker out of it (see the module docstring)."""
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]  # noqa: SLF001 - the documented workaround
    except Exception:  # noqa: BLE001 - no tracker running: nothing to forget
        pass


def unlink(name: str) -> bool:
    """Remove a segment by name (a dead worker's); False when it was not there. Not SharedMemory.unlink:
    that also tells the resource tracker, which was told to forget the segment already."""
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


def service_gone(service: str, shm_dir: Path = SHM_DIR) -> bool:
    """Whether no running service holds this id's mark (a mark nobody locks, or none at all)."""
    try:
        fd = os.open(shm_dir / f"{MARK}-{service}", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def reclaim(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the arenas of services that are no longer running (a SIGKILL leaves them behind), and their
    marks: those whose mark nobody holds, or that have no mark at all. Names of another form are left alone."""
    gone = []
    segments: dict[str, list[Path]] = {}
    for path in shm_dir.glob(f"{PREFIX}-*"):
        m = _SERVICE_SEGMENT.match(path.name)
        if m:
            segments.setdefault(m.group(1), []).append(path)
    services = set(segments) | {p.name[len(MARK) + 1:] for p in shm_dir.glob(f"{MARK}-*")}
    for service in services:
        if not service_gone(service, shm_dir):
            continue
        for path in segments.get(service, []):
            try:
                path.unlink()
                gone.append(path.name)
            except OSError:
                pass
        (shm_dir / f"{MARK}-{service}").unlink(missing_ok=True)
    return sorted(gone)


class ArenaFull(Exception):
    """No room for a request's tensors now."""


class Arena:
    """A worker's segment and the first-fit allocator over it."""

    def __init__(self, name: str, size: int) -> None:
        self.size = size
        self.shm = SharedMemory(name=name, create=True, size=size)
        _forget(self.shm)
        self.name = self.shm.name
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted, never adjacent
        self._lock = threading.Lock()  # tensors are written from the decode threads
        self.used = 0

    def alloc(self, nbytes: int) -> int:
        n = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                if length >= n:
                    if length == n:
                        del self._free[i]
                    else:
                        self._free[i] = (off + n, length - n)
                    self.used += n
                    return off
        raise ArenaFull(f"the worker's shared memory ({self.size >> 20} MB, EFFNET_SHM_MB) is full")

    def free(self, offset: int, nbytes: int) -> None:
        n = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self._lock:
            self.used -= n
            free = self._free
            lo, hi = 0, len(free)
            while lo < hi:  # where the block goes, by offset
                mid = (lo + hi) // 2
                if free[mid][0] < offset:
                    lo = mid + 1
                else:
                    hi = mid
            start, end = offset, offset + n
            if lo < len(free) and free[lo][0] == end:  # merge with the block after
                end += free[lo][1]
                del free[lo]
            if lo > 0 and free[lo - 1][0] + free[lo - 1][1] == start:  # and the one before
                start = free[lo - 1][0]
                del free[lo - 1]
                lo -= 1
            free.insert(lo, (start, end - start))

    def array(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        return float32_view(self.shm, offset, shape)

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:  # an array still points into it; the unlink below still frees it at exit
            pass
        unlink(self.name)


class Regions:
    """The engine's view of the workers' arenas: attached on first use, detached when a worker leaves."""

    def __init__(self) -> None:
        self._maps: dict[str, SharedMemory] = {}
        self._lingering: list[SharedMemory] = []  # detached, still mapped while an array of them lives

    def array(self, name: str, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        if self._lingering:
            self._sweep()
        shm = self._maps.get(name)
        if shm is None:
            shm = self._maps[name] = SharedMemory(name=name)
            _forget(shm)
        nbytes = int(np.prod(shape)) * 4
        if offset < 0 or offset + nbytes > shm.size:
            raise ValueError(f"a tensor at {offset}+{nbytes} lies outside arena {name} ({shm.size} bytes)")
        return float32_view(shm, offset, shape)  # holds the mapping while a batch uses it (detach)

    def detach(self, name: str) -> None:
        """A worker left. Its mapping goes once no array of it is left: a batch that holds one may still be
        running (a lone image is read where it lies, and the inference thread writes logits into the arena)."""
        shm = self._maps.pop(name, None)
        if shm is not None:
            self._lingering.append(shm)
        self._sweep()

    def _sweep(self) -> None:
        """Unmap the detached arenas no array points into any more."""
        still = []
        for m in self._lingering:
            try:
                m.close()
            except BufferError:  # still in use: tried again on the next array or detach
                still.append(m)
        self._lingering = still
