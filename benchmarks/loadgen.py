"""A closed-loop HTTP/1.1 load generator on raw asyncio streams, meant to run in its own process.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000/classify?model=b0 --body photo.jpg \
        --concurrency 32 --duration 8 --warmup 1 [--server-pgid PGID [--server-threads]]

N clients, each on one keep-alive connection, each sending the next request as soon as the
previous answer is in (so at most N requests are ever in flight: the load is bounded). The
request bytes are built once; a response is read as status line + headers + Content-Length
body, and only every `--sample`-th body is parsed as JSON (for the server's own timing
breakdown), so the generator spends well under a millisecond of CPU per request and leaves
the cores to the server it shares them with. Its own CPU use is measured (getrusage) and
reported, as is the server's when `--server-pgid` is given (every process of its group: the service's engine and
front-end workers, LitServe's and PyTriton's child processes); `--server-threads` adds the CPU time of each
thread of every process of the group over the window.

Measurement window: requests sent during `--warmup` are discarded; then every request sent
during the `--duration` window counts for latency (the generator waits for the ones still in
flight at the end), and throughput is the number of answers completed inside the window
divided by its length. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def _stat(path: Path) -> tuple[str, int] | None:
    """(comm, utime + stime in ticks) from a /proc/.../stat file."""
    try:
        head, _, rest = path.read_text().rpartition(")")
    except OSError:
        return None
    fields = rest.split()
    return head.split("(", 1)[1], int(fields[11]) + int(fields[12])


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def group_cpu_s(pgid: int) -> float:
    """utime + stime of every live process in a process group (a server and its child processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum(st[1] for pid in group_pids(pgid) if (st := _stat(Path(f"/proc/{pid}/stat")))) / tick


def threads_cpu_s(pgid: int) -> dict[str, tuple[int, str, float]]:
    """Every thread of every process of a group: tid -> (pid, comm, utime + stime seconds)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in group_pids(pgid):
        for t in Path(f"/proc/{pid}/task").glob("*"):
            if st := _stat(t / "stat"):
                out[t.name] = (pid, st[0], st[1] / tick)
    return out


def server_timing(answer: dict) -> dict:
    """Our service's per-image timing_ms (the first image of the answer); {} for any other server."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if isinstance(results, list) and results and isinstance(results[0], dict):
        return results[0].get("timing_ms") or {}
    return {}


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank-with-interpolation percentile of an already sorted list."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Stats:
    def __init__(self) -> None:
        self.records: list[tuple[float, float, int]] = []  # (sent, done, status)
        self.samples: list[dict] = []
        self.transport_errors = 0
        self.first_error: str | None = None
        self.inflight = 0  # requests sent and not yet answered (left over when the grace period ends)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    close = False
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size + 2))
        return status, b"".join(p[:-2] for p in parts), close
    if length is None:
        return status, await reader.read(), True
    return status, await reader.readexactly(length), close


async def _client(host: str, port: int, request: bytes, t_start: float, t_end: float, stats: Stats, sample: int) -> None:
    reader = writer = None
    n = 0
    while True:
        sent = time.perf_counter()
        if sent >= t_end:
            break
        counted = False
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
                sent = time.perf_counter()
            stats.inflight += 1
            counted = True
            writer.write(request)
            await writer.drain()
            status, body, close = await _read_response(reader)
            done = time.perf_counter()
            stats.inflight -= 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if counted:
                stats.inflight -= 1
            stats.transport_errors += 1
            stats.first_error = stats.first_error or f"{type(exc).__name__}: {exc}"
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)
            continue
        stats.records.append((sent, done, status))
        if sent >= t_start:
            n += 1
            if status == 200 and n % sample == 1 and len(stats.samples) < 2000:
                try:
                    stats.samples.append(server_timing(json.loads(body)))
                except ValueError:
                    pass
            elif status != 200 and stats.first_error is None:
                stats.first_error = f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def build_request(url: str, body: bytes, content_type: str, headers: list[str] | None = None) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    extra = "".join(f"{name.strip()}: {value.strip()}\r\n" for name, _, value in (h.partition(":") for h in headers or []))
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\nAccept: application/json\r\n{extra}\r\n"
    ).encode("latin-1")
    return host, port, head + body


async def run_load(url: str, body: bytes, content_type: str, concurrency: int, duration: float, warmup: float,
                   sample: int = 10, grace: float = 60.0, headers: list[str] | None = None,
                   server_pgid: int | None = None, threads: bool = False) -> dict:
    host, port, request = build_request(url, body, content_type, headers)
    stats = Stats()
    now = time.perf_counter()
    t_start = now + warmup
    t_end = t_start + duration
    tasks = [asyncio.create_task(_client(host, port, request, t_start, t_end, stats, sample)) for _ in range(concurrency)]

    def server_cpu() -> float | None:
        return group_cpu_s(server_pgid) if server_pgid else None

    def per_thread() -> dict:
        return threads_cpu_s(server_pgid) if server_pgid and threads else {}

    # Snapshot both sides' CPU at the start of the window.
    await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
    cpu0, srv0 = self_cpu_s(), server_cpu()
    thr0 = per_thread()
    await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
    cpu1, srv1 = self_cpu_s(), server_cpu()
    thr1 = per_thread()
    # The last requests of the window finish, within the grace period; the rest are abandoned
    # (counted as unfinished: their latency is missing from the percentiles).
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    out = summarise(stats, t_start, t_end, concurrency, cpu1 - cpu0,
                    None if srv0 is None or srv1 is None else srv1 - srv0)
    if thr1:
        # A thread that started inside the window counts from zero.
        out["server_threads"] = {tid: {"pid": pid, "comm": comm, "cpu_s": cpu - thr0.get(tid, (pid, comm, 0.0))[2]}
                                 for tid, (pid, comm, cpu) in thr1.items()}
    return out


def summarise(stats: Stats, t_start: float, t_end: float, concurrency: int, cpu_s: float, server_cpu_s: float | None) -> dict:
    window = t_end - t_start
    # Latency: every request sent inside the window. Throughput: every answer completed inside
    # it, whenever it was sent (with slow answers, dropping those sent during the warm-up would
    # leave the start of the window empty).
    measured = [r for r in stats.records if r[0] >= t_start]
    ok = sorted((done - sent) * 1000.0 for sent, done, status in measured if status == 200)
    completed_in_window = sum(1 for _, done, status in stats.records if status == 200 and t_start <= done <= t_end)
    statuses: dict[str, int] = {}
    for _, _, status in measured:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    breakdown: dict[str, float] = {}
    for key in ("decode", "preprocess", "queue", "inference", "total"):
        vals = [s[key] for s in stats.samples if isinstance(s.get(key), (int, float))]
        if vals:
            breakdown[key] = sum(vals) / len(vals)
    return {
        "concurrency": concurrency,
        "window_s": window,
        "requests": len(measured),
        "ok": len(ok),
        "errors": len(measured) - len(ok) + stats.transport_errors,
        "unfinished": stats.inflight,
        "statuses": statuses,
        "first_error": stats.first_error,
        "img_per_s": completed_in_window / window if window > 0 else None,
        "mean_ms": sum(ok) / len(ok) if ok else None,
        "p50_ms": percentile(ok, 50),
        "p95_ms": percentile(ok, 95),
        "p99_ms": percentile(ok, 99),
        "max_ms": ok[-1] if ok else None,
        "server_timing_ms": breakdown,  # mean of the sampled responses' timing_ms (our service only)
        "loadgen_cpu_s": cpu_s,
        "loadgen_cpu_pct": 100.0 * cpu_s / window if window > 0 else None,  # % of one core
        "loadgen_cpu_ms_per_req": 1000.0 * cpu_s / completed_in_window if completed_in_window else None,
        "server_cpu_s": server_cpu_s,
        "server_cpu_pct": None if server_cpu_s is None else 100.0 * server_cpu_s / window,
        "server_cpu_ms_per_img": None if not server_cpu_s or not completed_in_window else 1000.0 * server_cpu_s / completed_in_window,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, type=Path, help="file sent as the raw request body")
    p.add_argument("--content-type", default="image/jpeg")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra request header (repeatable)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0, help="measurement window, seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the window opens")
    p.add_argument("--server-pgid", type=int, help="also report the CPU use of this process group over the window")
    p.add_argument("--server-threads", action="store_true", help="also report each thread's CPU time (with --server-pgid)")
    p.add_argument("--sample", type=int, default=10, help="parse every n-th response body for timing_ms")
    p.add_argument("--grace", type=float, default=60.0, help="seconds to wait for the answers in flight when the window closes")
    args = p.parse_args(argv)
    result = asyncio.run(run_load(args.url, args.body.read_bytes(), args.content_type, args.concurrency,
                                  args.duration, args.warmup, max(1, args.sample), args.grace, args.header,
                                  args.server_pgid, args.server_threads))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
