"""`effnet serve` as the benchmark starts it: the same entry point, plus one idle thread that writes
which OS thread is which Python thread, so the CPU time of each thread (/proc/PID/task/TID/stat) can be
put under a stage.

    EFFNET_BENCH_THREADMAP=/tmp/threads.json python -m benchmarks.service_probe --host 127.0.0.1 --port 8000

Every 0.5 s, when it changed, the file gets {native thread id: Python thread name} for every Python
thread (MainThread = the event loop, decode_N = the decode pool, infer-<model>_0 = each model's
inference thread). Threads missing from it are native: ONNX Runtime's intra-op workers, libuv's
workers (named libuv-worker), gRPC's. Nothing else in the server changes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def _write_map(path: Path) -> None:
    last: dict[str, str] | None = None
    while True:
        current = {str(t.native_id): t.name for t in threading.enumerate()}
        if current != last:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(current))
            tmp.replace(path)
            last = current
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    target = os.environ.get("EFFNET_BENCH_THREADMAP")
    if target:
        threading.Thread(target=_write_map, args=(Path(target),), name="bench-threadmap", daemon=True).start()
    from effnet_serve.cli import main as effnet

    return effnet(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
