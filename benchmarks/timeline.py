"""`make bench-timeline`: where one request's time goes on a quiet service, hop by hop.

    python -m benchmarks.timeline --label before   # -> records in docs/benchmarks.jsonl, rendered into the
                                                   #    <!-- timeline-before --> block of docs/timeline.md
    python -m benchmarks.timeline --quick          # smoke: few requests, into a temp dir

One client sends a 256 px JPEG to b0 again and again over one keep-alive connection, each request with a W3C
`traceparent` of its own. The service runs with tracing on, exporting its spans over real OTLP/HTTP to a small
collector in this process, so each request's server spans can be laid beside the client's own clock (the same
machine, the same wall clock). Per hop, the median over the requests:

  to the app          client send -> the app's request span opens (accept, HTTP parse, routing, middleware)
  body                the body read (span `body`)
  open, admission     queue room (with worker processes: two round trips to the engine)
  decode              hand-off to the decode pool, decode and preprocess, back on the loop
  queue               the batcher's own queue time: enqueued -> the batch starts
  inference           the ORT run
  wake-ups and trips  the submit less those two: the batcher's wake-up, the result's way back to the loop,
                      and with worker processes the trips to the engine and back through shared memory
  answer              building and encoding the answer
  rest in the app     the request span less its children (result trip back, middleware, log line)
  write + read        the request span closes -> the client has read the whole answer

Both layouts run: the default (EFFNET_WORKERS = cores) and one process. Tracing has a cost of its own, so the
client's median without tracing is given beside it, measured in alternating blocks. `--before DIR` runs the
service of an older checkout beside this one's in the same alternation, so a change is judged in one run.
"""

from __future__ import annotations

import argparse
import http.client
import secrets
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.blocks import Contender, alternating, block_main, cores, jpeg, start_service
from benchmarks.harness import DEFAULT_REPO, QUICK_CACHE, build_models, free_port, log
from benchmarks.records import Hops

HOPS = ["to the app", "body", "open", "admission", "decode", "queue", "inference", "wake-ups and trips", "answer",
        "rest in the app", "write + read"]
# The request span's direct children; `queue` and `inference` lie inside `submit` (placed from the batcher's timings).
CHILD_SPANS = {"body", "open", "admission", "decode", "submit", "answer"}


class Block(list):
    """One block's requests, logged as a summary rather than every tuple."""

    def __repr__(self) -> str:
        return f"{len(self)} requests, median {statistics.median((t1 - t0) / 1e6 for _, t0, t1 in self):.2f} ms"


class Collector:
    """An OTLP/HTTP trace receiver (protobuf): spans by trace id, as (name, start_ns, end_ns)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: dict[str, list[tuple[str, int, int]]] = {}
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                with collector.lock:
                    for rs in req.resource_spans:
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                collector.spans.setdefault(s.trace_id.hex(), []).append(
                                    (s.name, s.start_time_unix_nano, s.end_time_unix_nano))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, trace_ids: list[str], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                done = all(any(n == "request" for n, _, _ in self.spans.get(t, [])) for t in trace_ids)
            if done:
                return
            time.sleep(0.2)
        log("timeline: some traces never arrived; they are left out")


def requests(c: Contender, image: bytes, n: int, traced: bool) -> list[tuple[str, int, int]]:
    """n requests one after the other on one connection: (trace id, client start ns, client end ns)."""
    conn = http.client.HTTPConnection("127.0.0.1", c.proc.port, timeout=30)
    out = Block()
    try:
        for _ in range(n):
            trace_id = secrets.token_hex(16)
            headers = {"Content-Type": "image/jpeg"}
            if traced:
                headers["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"
            t0 = time.time_ns()
            conn.request("POST", "/classify?model=b0", body=image, headers=headers)
            resp = conn.getresponse()
            resp.read()
            t1 = time.time_ns()
            if resp.status != 200:
                raise RuntimeError(f"{c.name}: HTTP {resp.status}")
            out.append((trace_id, t0, t1))
    finally:
        conn.close()
    return out


def hops(spans: list[tuple[str, int, int]], t0: int, t1: int) -> dict[str, float] | None:
    """One request's hops in ms, or None when its spans are incomplete."""
    req = [(s, e) for n, s, e in spans if n == "request"]
    if not req:
        return None
    rs, re_ = req[0]
    ms = {h: 0.0 for h in HOPS + ["submit"]}
    ms["to the app"] = (rs - t0) / 1e6
    ms["write + read"] = (t1 - re_) / 1e6
    inside = 0
    for name, s, e in spans:
        if name in CHILD_SPANS or name in ("queue", "inference"):
            ms[name] += (e - s) / 1e6
        if name in CHILD_SPANS:
            inside += e - s
    ms["wake-ups and trips"] = ms.pop("submit") - ms["queue"] - ms["inference"]
    ms["rest in the app"] = ((re_ - rs) - inside) / 1e6
    out = ms
    out["total"] = (t1 - t0) / 1e6
    return out


def run(plan: argparse.Namespace) -> list[Hops]:
    repo = QUICK_CACHE if plan.quick else DEFAULT_REPO
    plan.requests = plan.requests or (10 if plan.quick else 100)
    build_models(repo, ["b0"], allow_build=True)
    image = jpeg(plan.work, "256px")[0].read_bytes()
    collector = Collector()
    traced_env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "200",
                  "EFFNET_ACCESS_LOG": "true"}
    layouts = [("service", cores()), ("service, 1 process", 1)]
    trees = [("", None)] + ([(" (before)", plan.before.resolve())] if plan.before else [])
    started: list[Contender] = []
    try:
        for label, workers in layouts:
            for suffix, tree in trees:
                for traced in (True, False):
                    name = label + suffix + ("" if traced else ", untraced")
                    started.append(start_service(plan.work, repo, "b0", workers, {"EFFNET_GRPC_PORT": "0", **(traced_env if traced else {})},
                                                 name=name, tree=tree))
        for c in started:  # warm each (the first runs of a shape are slow)
            requests(c, image, 20, traced=False)
        rows = alternating(started, plan.rounds, lambda c: requests(c, image, plan.requests, "untraced" not in c.name),
                           "timeline")
    finally:
        for c in started:
            c.stop()
    plan.settings = {"requests": plan.requests, "rounds": plan.rounds, "before": str(plan.before) if plan.before else None}
    out = []
    for label in [layout + suffix for layout, _ in layouts for suffix, _ in trees]:
        done = [r for block in rows[label] for r in block]
        collector.wait_for([t for t, _, _ in done])
        per = [h for t, t0, t1 in done if (h := hops(collector.spans.get(t, []), t0, t1)) is not None]
        untraced = [(t1 - t0) / 1e6 for block in rows[label + ", untraced"] for _, t0, t1 in block]
        out.append(Hops(label, len(per), {h: statistics.median(p[h] for p in per) for h in HOPS + ["total"]},
                        statistics.median(untraced)))
    return out


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", default="current", help="the block of docs/timeline.md to write (before, after, ...)")
    p.add_argument("--requests", type=int, default=None, help="requests per block (default 100; --quick 10)")
    p.add_argument("--before", type=Path, default=None,
                   help="a checkout of an earlier commit (git worktree add DIR COMMIT): its service is measured "
                        "beside this one's, alternating, as '(before)'")


def main() -> int:
    return block_main("timeline", run, rounds=3, options=options)


if __name__ == "__main__":
    sys.exit(main())
