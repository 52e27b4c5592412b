"""The same work without a server: the ceiling a server on this machine is measured against.

    python -m benchmarks.serverless --model-dir .cache/bench-repo/b0 --image b0-256px.jpg --duration 6

One process: `--threads` threads decode and preprocess the JPEG with plain Pillow (benchmarks/peers/common.py,
as a user writes torchvision's eval transform) into a bounded queue, while the main thread runs a default
ONNX Runtime session on batches of `--batch`. No HTTP, no admission, no answers to encode: what is left is
decode, preprocessing and the model. Prints one JSON object: images per second over the window (after a
warm-up), and the process's CPU seconds per image. With `--latency N`: one request of N images at a time
(N decodes side by side, then one batch of N), and its median and p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from common import load_model_dir, preprocess  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--threads", type=int, default=2, help="decode + preprocess threads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="time requests instead: N images decoded side by side (N threads), then one batch of N")
    p.add_argument("--tensors", action="store_true", help="with --latency: the tensors ready, only the model timed")
    args = p.parse_args()

    onnx_path, manifest = load_model_dir(args.model_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])  # ORT's defaults
    name = session.get_inputs()[0].name
    data = Path(args.image).read_bytes()
    pp = manifest["preprocess"]
    if args.latency:
        latency(session, name, data, pp, args)
        return
    ready: queue.Queue[np.ndarray] = queue.Queue(maxsize=4 * args.batch)
    stop = threading.Event()

    def decode() -> None:
        while not stop.is_set():
            x = preprocess(data, pp)
            while not stop.is_set():
                try:
                    ready.put(x, timeout=0.1)
                    break
                except queue.Full:
                    pass

    threads = [threading.Thread(target=decode, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    done, t_start, c_start = 0, None, None
    t0 = time.perf_counter()
    while True:
        batch = np.stack([ready.get() for _ in range(args.batch)])
        session.run(None, {name: batch})
        now = time.perf_counter()
        if t_start is None and now - t0 >= args.warmup:
            t_start, c_start = now, cpu_s()
        elif t_start is not None:
            done += args.batch
            if now - t_start >= args.duration:
                break
    elapsed, used = time.perf_counter() - t_start, cpu_s() - c_start
    stop.set()
    print(json.dumps({"img_per_s": done / elapsed, "cpu_ms_per_image": 1000.0 * used / done, "images": done,
                      "window_s": elapsed, "threads": args.threads, "batch": args.batch}))


def latency(session: ort.InferenceSession, name: str, data: bytes, pp: dict, args: argparse.Namespace) -> None:
    """The quiet-service ceiling: one request of N images at a time, start to answer, as a script would do it."""
    from concurrent.futures import ThreadPoolExecutor

    n = args.latency
    pool = ThreadPoolExecutor(max_workers=n)
    ready = np.stack([preprocess(data, pp)] * n)
    times: list[float] = []
    t0 = time.perf_counter()
    while True:
        start = time.perf_counter()
        batch = ready if args.tensors else np.stack(list(pool.map(lambda _: preprocess(data, pp), range(n))))
        session.run(None, {name: batch})
        now = time.perf_counter()
        if now - t0 >= args.warmup:
            times.append(now - start)
            if now - t0 >= args.warmup + args.duration:
                break
    times.sort()
    pick = lambda q: 1000.0 * times[min(len(times) - 1, int(q / 100 * len(times)))]  # noqa: E731
    print(json.dumps({"images": n, "requests": len(times), "p50_ms": pick(50), "p99_ms": pick(99)}))


if __name__ == "__main__":
    main()
