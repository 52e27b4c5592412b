"""Models a running `effnet build` has still to write into the repository (`make serve` serves while it builds).

The build announces what it has left in `<repository>/.building.json` ({"pid", "host", "models"}), rewrites it
as each model lands and removes it when it ends (build/repository.py `BuildAnnouncement`). The registry never
sees the file (dot names are skipped); `/health/ready` lists the names, so a person watching it knows the rest
is coming. A file left by a build that was killed is ignored: written on this host by a pid that is gone.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from ..core.limits import pid_alive

FILE = ".building.json"  # build/repository.py writes it under the same name


def pending(repository: Path) -> list[str]:
    """The names a live build has still to write, in its order; [] when none builds (or the file is unreadable)."""
    try:
        data = json.loads((repository / FILE).read_text())
        models = [str(m) for m in data["models"]]
        pid, host = int(data["pid"]), str(data["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if host == socket.gethostname() and not pid_alive(pid):
        return []
    return models

