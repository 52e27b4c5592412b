"""Imported at start-up by every Python process of a service the benchmark starts: benchmarks/probe goes on that
service's PYTHONPATH, and the engine and the front-end workers (started with `spawn`) inherit it. With
EFFNET_BENCH_THREADMAP=DIR, one idle thread writes DIR/<pid>.json when it changed (every 0.5 s):
{"process": multiprocessing's name for it, "threads": {native thread id: Python thread name}}, so that each
thread's CPU time (/proc/PID/task/TID/stat) can be put under a stage. Threads missing from it are native: ONNX
Runtime's intra-op pool, libuv's and gRPC's. Nothing else in the service changes."""

import os

if _DIR := os.environ.get("EFFNET_BENCH_THREADMAP"):
    import json
    import sys
    import threading
    import time

    def _write(path: str) -> None:
        last = None
        while True:
            mp = sys.modules.get("multiprocessing")
            now = {"process": mp.current_process().name if mp else "MainProcess",
                   "threads": {str(t.native_id): t.name for t in threading.enumerate()}}
            if now != last:
                with open(path + ".tmp", "w") as f:
                    json.dump(now, f)
                os.replace(path + ".tmp", path)
                last = now
            time.sleep(0.5)

    threading.Thread(target=_write, args=(os.path.join(_DIR, f"{os.getpid()}.json"),), name="bench-threadmap",
                     daemon=True).start()
