"""A child process that must not outlive the process that started it."""

from __future__ import annotations

import ctypes
import os
import signal


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies, however it dies (a SIGKILL or an OOM kill
    included), so that no worker, engine or parser outlives it holding ports, memory and models. No-op
    elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    # The parent died before the request was made: this process has another parent now. Compared with the
    # parent's pid, not with 1: in a container without an init the supervisor is pid 1 itself.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
