"""Memory under a long burst: issue 5's "RSS after a 10-minute burst within 10% of after warm-up".

    python -m benchmarks.soak [--minutes 10] [--models b0,b2,b4,b7] [--clients 16]

Starts `effnet serve` on the benchmark repository with all of b0..b7 loaded, warms every burst
model up with a short burst, and records VmRSS summed over its processes: that is the reference. Then it runs the load
for `--minutes`, in 30-second segments that rotate over the burst models (1920×1080 JPEG
photos, `--clients` keep-alive clients from the separate load-generator process), and samples
RSS after every segment. Too long for `make bench` (which must stay under 10 minutes), so it is
its own target: `make bench-soak`. Writes docs/benchmarks-soak.json and the `<!-- soak -->`
block of docs/benchmarks.md, which `make bench` keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ALL_B, DEFAULT_REPO, ROOT, Process, free_port, loadgen, memory_kib, python_env, write_photo

SEGMENT_S = 30.0
WARMUP_S = 8.0
TARGET = 0.10


def log(msg: str) -> None:
    print(f"[bench-soak] {msg}", file=sys.stderr, flush=True)


def gib(kib: int) -> float:
    return kib / (1024 * 1024)


def markdown(d: dict) -> str:
    ref, end, peak = d["rss_after_warmup_kib"], d["rss_end_kib"], max(s["rss_kib"] for s in d["samples"])
    growth = end / ref - 1
    met = "met" if growth <= TARGET else "**missed**"
    L = ["<!-- soak -->", "## Memory over a long burst (`make bench-soak`)", ""]
    L.append(f"Written by `{d['command']}` on {d['date']}; {d['machine'].get('cpu')}, {d['machine'].get('cores')} cores. "
             f"`effnet serve` with {', '.join(d['loaded'])} loaded; {d['minutes']:g} minutes of {d['clients']} clients "
             f"posting a 1920×1080 JPEG, in {SEGMENT_S:.0f}-second segments rotating over {', '.join(d['burst_models'])}: "
             f"{d['requests']:,} answers ({d['errors']} errors).")
    L.append("")
    L.append(f"| RSS after warm-up | at the end | peak sample | growth | target ≤ +{TARGET:.0%} |")
    L.append("| ---: | ---: | ---: | ---: | --- |")
    L.append(f"| {gib(ref):.2f} GiB | {gib(end):.2f} GiB | {gib(peak):.2f} GiB | {growth:+.1%} | {met} |")
    L.append("")
    L.append("RSS after each segment (GiB): " + ", ".join(f"{gib(s['rss_kib']):.2f} ({s['model']})" for s in d["samples"]))
    L.append("<!-- /soak -->")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--models", default="b0,b2,b4,b7", help="models the burst rotates over (default b0,b2,b4,b7)")
    p.add_argument("--load", default=",".join(ALL_B), help="models loaded in the server (default b0..b7)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--repo", type=Path, default=DEFAULT_REPO)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args(argv)
    burst, loaded = args.models.split(","), args.load.split(",")
    missing = [m for m in set(burst + loaded) if not (args.repo / m / "manifest.json").is_file()]
    if missing:
        raise SystemExit(f"{args.repo} lacks {', '.join(sorted(missing))}: run make bench first (it builds them)")

    from benchmarks.blocks import machine_info, write_owned_block

    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        body = write_photo(Path(tmp) / "photo.jpg")
        port = free_port()
        env = {**python_env(), "EFFNET_REPOSITORY": str(args.repo), "EFFNET_MODELS": ",".join(loaded),
               "EFFNET_DEFAULT_MODEL": burst[0], "EFFNET_GRPC_PORT": "0"}
        server = Process("effnet serve", [sys.executable, "-m", "effnet_serve", "serve", "--port", str(port)], env, port,
                         Path(tmp) / "server.log")
        try:
            server.wait_ready(600)
            for m in burst:  # every batch shape and every code path touched once before the reference
                loadgen(f"{server.base}/classify?model={m}", body, args.clients, WARMUP_S, 1.0, 60, server_pgid=server.pid)
            ref = memory_kib(server.pid)["VmRSS"]  # every process of the service (engine, workers, supervisor)
            log(f"after warm-up: {gib(ref):.2f} GiB; bursting for {args.minutes:g} minutes")
            samples, requests, errors = [], 0, 0
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < args.minutes * 60:
                model = burst[i % len(burst)]
                r = loadgen(f"{server.base}/classify?model={model}", body, args.clients, SEGMENT_S, 0.0, 120, server_pgid=server.pid)
                requests += r["ok"]
                errors += r["errors"]
                samples.append({"t_s": round(time.monotonic() - t0, 1), "model": model, "rss_kib": memory_kib(server.pid)["VmRSS"]})
                log(f"{samples[-1]['t_s']:>6.0f} s  {model}: RSS {gib(samples[-1]['rss_kib']):.2f} GiB")
                i += 1
            end = memory_kib(server.pid)["VmRSS"]
        finally:
            server.stop()
    data = {
        "command": " ".join(["python -m benchmarks.soak", *argv]).strip(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_info(), "minutes": args.minutes,
        "clients": args.clients, "loaded": loaded, "burst_models": burst, "requests": requests, "errors": errors,
        "rss_after_warmup_kib": ref, "rss_end_kib": end, "samples": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks-soak.json").write_text(json.dumps(data, indent=2) + "\n")
    write_owned_block(args.out / "benchmarks.md", "soak", markdown(data))
    log(f"RSS {gib(ref):.2f} -> {gib(end):.2f} GiB ({end / ref - 1:+.1%}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
