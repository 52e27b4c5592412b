"""What the container may use: CPU cores and memory as its cgroup says, not as the host says.

`os.cpu_count()` and `sched_getaffinity` report the node's cores; a pod limited to 2 CPUs on a 64-core node
would start 64 decode threads and 64 ORT threads per session. The cgroup's CPU quota (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`) is the real budget; the memory limit (v2 `memory.max`, v1
`memory.limit_in_bytes`) sizes the default budget for request bytes and pixels in flight.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
# v1 reports "no limit" as a huge number (close to the page-aligned maximum of a signed 64-bit integer).
_V1_UNLIMITED = 1 << 60


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup may use (e.g. 1.5), or None when unlimited or unknown."""
    v2 = _read(root / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    v1_quota, v1_period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if v1_quota and v1_period and int(v1_quota) > 0:
        return int(v1_quota) / int(v1_period)
    return None


def memory_limit(root: Path = CGROUP) -> int | None:
    """The cgroup's memory limit in bytes, or None when unlimited or unknown."""
    v2 = _read(root / "memory.max")
    if v2:
        return None if v2 == "max" else int(v2)
    v1 = _read(root / "memory" / "memory.limit_in_bytes")
    if v1 and int(v1) < _V1_UNLIMITED:
        return int(v1)
    return None


def cores(root: Path = CGROUP) -> int:
    """Cores this process may really use: the affinity mask, capped by the cgroup quota (rounded up)."""
    try:
        visible = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        visible = os.cpu_count() or 1
    quota = cpu_quota(root)
    if quota is not None:
        visible = min(visible, math.ceil(quota))
    return max(1, visible)


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_inflight_mb(root: Path = CGROUP) -> float:
    """A quarter of the memory the process may have (the rest is for the models, their arenas and Python),
    at least 256 MB."""
    limit = memory_limit(root) or physical_memory()
    return max(256.0, limit / 4 / (1 << 20))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
