"""docs/benchmarks.md (and .png) from one run's records: one template, a function a section. Everything in the
Markdown is generated except the blocks other benchmark scripts own and the manual notes, kept from the previous
file (benchmarks.blocks). The history across sessions is docs/benchmarks-history.md, kept by hand.

    python -m benchmarks.report [--out docs]   # render again from the latest run in <out>/benchmarks.jsonl
    python -m benchmarks.report --models-json F  # the latest run's per-model latency for `effnet report --bench F`
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks.blocks import kept_blocks
from benchmarks.harness import DOCS
from benchmarks.records import BatchTable, LoadWindow, OrtTiming, PerfRow, Record, Results, Server, append, latest
from benchmarks.targets import GIB, stage_split, targets

NOT_RUN = "Not run.\n"
CONTENDED_PCT = 20.0  # other processes' CPU during the run, % of one core, above which the doc says so
_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(?:[×%]| / [\d,.]+)?(?: \(.*\))?$|^–$")


def f(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; columns whose every cell is a number are right-aligned."""
    numeric = [bool(rows) and all(_NUMERIC.match(r[i].strip("*")) for r in rows) for i in range(len(header))]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def ips_ms(t: OrtTiming | None) -> str:
    return "–" if not t else f"{t.img_per_s:.1f} / {t.ms_p50:.1f}"


def header(res: Results) -> str:
    run, m = res.run, res.run.machine
    notes = ["> **Quick (smoke) run**: tiny custom models and ~1 s windows. It checks that the benchmark works; its numbers "
             "mean nothing.\n"] if run.quick else []
    others = run.others_cpu_pct or 0.0
    if others > CONTENDED_PCT and not run.quick:
        notes.append(f"> **Contended run**: other processes used about {others:.0f}% of one core (of {m.get('cores')}) while it "
                     "ran. Every comparison is between measurements of this one run, mostly alternating or side by side, so "
                     "ratios hold better than absolute numbers; still, read differences under ~10% as noise.\n")
    lines = [f"- **Command**: `{run.command}`",
             f"- **Date**: {run.started} → {run.finished} (measured run {run.run_s:.0f} s; building missing models beforehand "
             f"{run.build_s:.0f} s" + (f", PyTriton venv {run.pytriton_setup_s:.0f} s" if run.pytriton_setup_s is not None else "") + ")",
             f"- **Machine**: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB RAM; {m.get('platform')}"
             + (f"; ISA: {m['isa']}" if m.get("isa") else "")]
    if len(run.loadavg) == 2:
        lines.append(f"- **Load**: 1-minute load average {run.loadavg[0]:.2f} at the start, {run.loadavg[1]:.2f} at the end; other "
                     f"processes' CPU during the run {others:.0f}% of one core (the machine's busy time less this run's)")
    lines.append(f"- **Versions**: Python {m.get('python')}, "
                 + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v))
    if m.get("git"):
        lines.append(f"- **Code**: git {m['git']}")
    if m.get("effnet_env"):
        lines.append("- **EFFNET_* environment**: " + ", ".join(f"`{k}={v}`" for k, v in sorted(m["effnet_env"].items())))
    lines += [f"- **Models**: {', '.join(run.models)} (random weights: the speed of real ones); matrix: {', '.join(run.full)}; "
              f"loaded in the service: {', '.join(run.loaded)}; repository `{run.repo}`",
              f"- **Method**: everything in one run on one machine, so ratios hold where absolute times drift. Load windows "
              f"{run.window_s:g} s after {run.warmup_s:g} s of warm-up; raw ORT {run.raw_s:g} s per batch size. The load generator "
              "(`benchmarks/loadgen.py`) runs in its own process: N closed-loop clients on keep-alive connections (raw asyncio "
              "streams), each sending its next request when the previous answer is in.",
              "- **Records**: every run's numbers are typed records appended to `benchmarks.jsonl` (`benchmarks/records.py`); "
              "this file renders the latest. What each change bought, session by session: "
              "[benchmarks-history.md](benchmarks-history.md), kept by hand.\n"]
    return "\n".join(notes + lines)


def raw_section(res: Results) -> str:
    run = res.run
    if "raw" not in run.phases:
        return NOT_RUN
    sizes = sorted({t.batch for t in res.of(OrtTiming) if t.phase == "raw" and t.session == "server"})
    rows = []
    for n in run.models:
        mod = res.models[n]
        d = {b: res.ort("raw", n, "default", b) for b in (1, 8)}
        s = {b: res.ort("raw", n, "server", b) for b in sizes}
        rows.append([n, str(mod.px), f(mod.macs / 1e9, 2), ips_ms(d[1]), ips_ms(d[8]), *(ips_ms(s[b]) for b in sizes),
                     *(f"{s[b].img_per_s / d[b].img_per_s:.2f}" if d[b] and s.get(b) else "–" for b in (1, 8)),
                     " / ".join(f(d[b].cpu_ms_per_img) for b in (1, 8) if d[b]),
                     f"{mod.best_batch}" + ("" if mod.best_batch_written else " (not written)")])
    bt = next(iter(res.of(BatchTable)), None)
    return (f"*Default session* (the ceiling): `onnxruntime.InferenceSession(path, providers=[\"CPUExecutionProvider\"])` with "
            f"`intra_op_num_threads={run.threads}` (the service's thread count) and nothing else set: ORT's arena per session, "
            f"memory patterns and spinning at their defaults. *Server's session*: `app.engine.sessions.create_session` as the "
            f"server creates it ({run.threads} intra-op threads, inter-op 1, sequential, arena `{run.ort_arena}`, spinning "
            f"{run.ort_spinning}). Random input, `session.run` in a loop, the two sessions of a model alternating (2 turns each) "
            f"at the sizes both run. Cells: img/s / median ms per run.\n\n"
            + table(["model", "px", "GMACs", "default b1", "default b8", *(f"server's b{b}" for b in sizes),
                     "server's ÷ default b1", "server's ÷ default b8", "ORT CPU ms/img, default b1 / b8", "best batch (server's)"], rows)
            + f"\n\nBest batch = the smallest size of the server's session within 3% of its highest throughput. Written to "
            f"`{bt.path if bt else '?'}` under `\"{bt.device if bt else '?'}\"` (merged with what was there), which the server reads "
            f"at start-up: {json.dumps(bt.written if bt else {})}. A model measured only at batch 1 and 2 gets an entry only when "
            "batch 2 is already slower. *ORT CPU ms/img*: this process's CPU time over the timed runs per image (both ORT threads).\n")


def _stages(t: dict[str, float]) -> str:
    return "/".join(f(x) for x in ((t.get("decode", 0) + t.get("preprocess", 0)) if t else None, t.get("queue"), t.get("inference")))


def service_section(res: Results) -> str:
    service = [w for w in res.of(LoadWindow) if w.server == "service"]
    if not service or not res.memory:
        return NOT_RUN
    photo = next((w.body_bytes for w in service if w.input == "photo"), 0)
    rows = [[w.model, w.input, w.body, str(w.clients), f(w.img_per_s), f(w.p50_ms), f(w.p95_ms), f(w.p99_ms),
             str(w.errors) + (f" (+{w.unfinished} unfinished)" if w.unfinished else ""), f(w.mean_batch, 2),
             _stages(w.timing_ms), f(w.server_cpu_pct, 0), f(w.server_cpu_ms_per_img),
             f"b{w.raw_batch}: {w.raw_img_per_s:.1f} / {w.raw_ms_p50:.1f}" if w.raw_batch and w.raw_img_per_s and w.raw_ms_p50 else "–"]
            for w in service]
    out = [f"`effnet serve` (subprocess, 127.0.0.1; `benchmarks/probe/sitecustomize.py` on its path adds one idle thread to "
           f"each of its processes that names their threads) with {', '.join(res.memory.models)} loaded, default `EFFNET_*` settings and the "
           f"batch table above; max batch per model as the server reported it: {json.dumps(res.memory.max_batch)}. Inputs: a JPEG "
           f"at the model's resolution (model-res) and a 1920×1080 photo, quality 90 ({photo // 1024} KiB), sent as the raw body "
           "(`Content-Type: image/jpeg`) or as the peers' multipart body (field `file`).\n",
           table(["model", "input", "body", "N", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch", "stages ms",
                  "server CPU %", "CPU ms/img", "default session next to it (img/s / ms)"], rows),
           "\n*mean batch*: images per inference run (`effnet_batch_size` histogram, window and warm-up); *server CPU*: the "
           "server's process group over the window, % of one core and per image; *stages*: mean `results[0].timing_ms` of "
           "every 10th answer (decode+preprocess / queue / inference); *default session next to it*: raw ORT's default session "
           "measured right before the 1-client window (batch 1) and right after the top-N model-res window (batch 8).\n",
           "### CPU time per image by stage (target 5)\n",
           "The CPU time over the window of each thread of every process of the service (`/proc/PID/task/TID/stat`: the "
           "supervisor, the engine and the front-end workers), per answered image (ms). *HTTP + answer*: the front ends' "
           "event-loop threads (HTTP parsing, multipart, routing, admission, JSON answer); *decode* and *preprocess*: the "
           "decode pools, split by the two stages' wall times from `timing_ms`; *engine loop*: the engine process's event loop "
           "(batching, the link to the front ends); *ORT*: each model's inference thread (it runs one share of ORT's intra-op "
           "work, plus softmax/top-k) and ORT's pool threads; *other*: the remaining threads (the supervisor's, libuv's, "
           "gRPC's). *ORT, raw*: the default session's CPU per image at batch 1 / 8 in the raw phase.\n"]
    rows = []
    for w in service:
        if not (sp := stage_split(w)):
            continue
        outside = {k: v for k, v in sp.items() if k != "ORT"}
        raw = " / ".join(f(t.cpu_ms_per_img) for b in (1, 8) if (t := res.ort("raw", w.model, "default", b)))
        rows.append([w.model, w.input, w.body, str(w.clients), f(w.server_cpu_ms_per_img), *(f(v) for v in outside.values()),
                     f(sum(outside.values())), f(sp["ORT"]), raw or "–", max(outside, key=outside.__getitem__)])
    out.append(table(["model", "input", "body", "N", "server CPU ms/img", "HTTP + answer", "decode", "preprocess", "engine loop",
                      "other", "outside ORT", "ORT", "ORT, raw b1 / b8", "largest outside ORT"], rows) + "\n")
    over = []
    for w in service:
        t = w.timing_ms
        if w.clients != 1 or w.raw_batch != 1 or w.raw_ms_p50 is None or not t.get("total") or w.p50_ms is None:
            continue
        stages = sum(t.get(k, 0.0) for k in ("decode", "preprocess", "queue", "inference"))
        over.append([w.model, w.input, f(w.p50_ms), f(w.raw_ms_p50), f(w.p50_ms - w.raw_ms_p50), f(t.get("decode")),
                     f(t.get("preprocess")), f(t.get("queue")), f(t.get("inference", 0.0) - w.raw_ms_p50), f(t["total"] - stages),
                     f(w.p50_ms - t["total"])])
    if over:
        out += ["### Where the time over raw ORT goes at 1 client (target 4)\n",
                "ms; raw = the default session at batch 1 measured right before the window; the rest from the server's own "
                "`timing_ms` (mean of sampled answers). *in handler, other*: thread hops, softmax/top-k, building the answer; "
                "*outside handler*: HTTP, the load generator, the network stack.\n",
                table(["model", "input", "p50", "raw batch 1", "over raw", "decode", "preprocess", "queue", "inference − raw",
                       "in handler, other", "outside handler"], over) + "\n"]
    return "\n".join(out)


def peers_section(res: Results) -> str:
    servers = [s for s in res.of(Server) if s.name != "service"]
    if not servers:
        return NOT_RUN
    n, head = res.top_n, res.head
    base = {k: res.service(head, k, n, "multipart") for k in ("model-res", "photo")}
    service_rss = res.memory.after_load_kib if res.memory else None
    entries = [("service, multipart", "service", "multipart", service_rss), ("service, raw image/jpeg", "service", "raw", None)]
    entries += [(s.name, s.name, None, s.rss_kib) for s in servers]
    notes = {s.name: s.note for s in servers if s.note}
    rows = []
    for label, name, body, rss in entries:
        if name in notes:
            rows.append([label, "–", *["–"] * 7, f"not run: {notes[name]}".replace("|", "\\|")])
            continue
        for kind in ("model-res", "photo"):
            if not (w := res.window(name, head, kind, n, body)):
                continue
            b = base[kind]
            ratio = f"{b.img_per_s / w.img_per_s:.2f}×" if b and b.img_per_s and w.img_per_s and w is not b else "–"
            rows.append([label, kind, f(w.img_per_s), f(w.p50_ms), f(w.p99_ms), str(w.errors), f(w.server_cpu_pct, 0),
                         f(w.server_cpu_ms_per_img), f(rss / GIB, 2) if rss else "–", ratio])
    return (f"{head} at {n} clients, the same JPEG bytes, the same load generator, each server alone on the machine (the "
            "service's rows come from section 2: its server had every memory model loaded). *server CPU*: the whole process "
            "group (LitServe and PyTriton work in child processes); *RSS*: the group's, after the load. *service ÷*: the "
            "service's multipart img/s over the row's.\n\n"
            + table(["server", "input", "img/s", "p50 ms", "p99 ms", "errors", "server CPU %", "CPU ms/img", "RSS GiB", "service ÷"], rows)
            + "\n\n" + "\n".join(f"- **{s.name}**: {s.what}" + (f"; ready after {s.ready_s:.0f} s" if s.ready_s else "") for s in servers)
            + "\n\nThe peers are in `benchmarks/peers/` (README there); none is part of the product.\n")


def perf_section(res: Results) -> str:
    runs = res.of(PerfRow)
    if not runs:
        return NOT_RUN
    p = runs[0]
    rows = [[f"perf_analyzer, {r.protocol}", f"FP32 tensors, batch {r.batch}", f"{r.concurrency} requests", f(r.img_per_s),
             f(r.p50_ms), f(r.p99_ms), f"within {r.stability_pct}%" if r.stable else "no"] if r.img_per_s
            else [f"perf_analyzer, {r.protocol}", "–", "–", "–", "–", "–", r.status] for r in runs]
    for body in ("raw", "multipart"):
        if w := res.service(p.model, "model-res", res.top_n, body):
            rows.append([f"load generator, {body} body", "model-res JPEG, 1 image", f"{w.clients} clients", f(w.img_per_s),
                         f(w.p50_ms), f(w.p99_ms), "–"])
    asked = f" (the model's max batch; {p.requested_batch} asked)" if p.batch != p.requested_batch else ""
    return (f"Triton's `perf_analyzer` (tritonclient 2.41.1, `make perf-analyzer`) against the same `effnet serve`: model "
            f"{p.model}, batch {p.batch}{asked}, random FP32 tensors as binary data, {res.run.perf_interval_ms / 1000:g} s windows "
            f"until three agree within 25% (at most {res.run.perf_trials}; once more within 60% when they do not: column "
            "*stable*). **It measures something else than the load generator**: preprocessed tensors to "
            f"`/v2/models/{p.model}/infer` (no JPEG decode, no resize; {p.request_mb:.1f} MB per request), while the load "
            "generator uploads JPEGs to `/classify`.\n\n"
            + table(["tool", "sends", "concurrency", "img/s", "p50 ms", "p99 ms", "stable"], rows) + "\n"
            + "".join(f"\n`{r.command}`" + ("" if r.rc == 0 else f" — exit {r.rc}") + "\n" for r in runs if r.command))


def memory_section(res: Results) -> str:
    mem, run = res.memory, res.run
    if not mem:
        return NOT_RUN
    rows = [["idle, just ready", f(mem.idle_kib / GIB, 2)],
            [f"after a burst of photos on each model ({run.burst_clients} clients, {run.burst_s:g} s each)", f(mem.after_burst_kib / GIB, 2)],
            ["after all the load of section 2", f(mem.after_load_kib / GIB, 2)], ["peak (VmHWM)", f(mem.hwm_kib / GIB, 2)]]
    return (f"VmRSS of `effnet serve` summed over its processes (supervisor, engine, front-end workers; the peak: each one's "
            f"VmHWM, summed) with {', '.join(mem.models)} loaded (ready after {mem.ready_s:.0f} s, each "
            f"session warmed at its batch sizes), ORT arena `{run.ort_arena}`.\n\n" + table(["when", "RSS GiB"], rows) + "\n")


def markdown(res: Results, precision: dict | None, png: str | None, kept: str) -> str:
    checks = targets(res, precision)
    sections = [("Targets (issue 14)", table(["target", "status", "numbers"], [[c.goal, f"**{c.status}**", c.numbers] for c in checks]) + "\n"),
                ("1. Raw ONNX Runtime: the ceiling (default session) and the server's session", raw_section(res)),
                ("2. The service", service_section(res)),
                ("3. Peers", peers_section(res)),
                ("4. perf_analyzer beside the load generator", perf_section(res)),
                ("5. Memory", memory_section(res)),
                ("6. Throughput and p95 latency vs MACs", f"![throughput and p95 latency vs MACs]({png})\n" if png else NOT_RUN),
                ("GPU: unmeasured", "`make bench` measures the CPU only (ONNX Runtime providers here: "
                 f"{', '.join(res.run.machine.get('ort_providers', []))}). The GPU figures (CUDA EP with IOBinding, TensorRT EP, b0 and b4 "
                 "at batch 1/8/32/128, raw and through the service) need a GPU machine and are not part of this run.\n")]
    return "\n".join(["# Benchmarks\n", "<!-- Written by `python -m benchmarks.run` (make bench) from the latest run in "
                      "benchmarks.jsonl. Edits outside the manual markers and the owned blocks are overwritten. -->\n",
                      header(res), *(f"## {title}\n\n{body}" for title, body in sections), kept, ""])


def render(out: Path) -> list[Path]:
    """benchmarks.md and .png in `out` from the latest run in its benchmarks.jsonl; the blocks of the old .md kept."""
    from benchmarks.report_plot import plot

    res = Results(latest(out / "benchmarks.jsonl"))
    md, png = out / "benchmarks.md", out / "benchmarks.png"
    try:
        precision = json.loads((out / "benchmarks-precision.json").read_text())
    except (OSError, ValueError):
        precision = None
    plotted = plot(png, res)
    md.write_text(markdown(res, precision, png.name if plotted else None, kept_blocks(md.read_text() if md.is_file() else "")))
    return [md] + ([png] if plotted else [])


def write(out: Path, run_id: str, records: list[Record]) -> list[Path]:
    append(out / "benchmarks.jsonl", run_id, records)
    return [out / "benchmarks.jsonl", *render(out)]


def models_json(res: Results) -> dict:
    """What `effnet report --bench` reads: per model, p50/p95 at 1 client and the best throughput on 1920x1080 photos
    through the service, else raw ORT's default session at batch 1."""
    models = {}
    for name in res.run.models:
        photos = [w for w in res.of(LoadWindow) if (w.server, w.model, w.input, w.body) == ("service", name, "photo", "raw")]
        one, b1 = res.service(name, "photo", 1), res.ort("raw", name, "default", 1)
        if one and photos:
            best = max(photos, key=lambda w: w.img_per_s or 0.0)
            models[name] = {"p50_ms": one.p50_ms, "p95_ms": one.p95_ms, "img_per_s": best.img_per_s,
                            "source": f"service, 1920x1080 JPEG; latency at 1 client, throughput at {best.clients} clients"}
        elif b1:
            models[name] = {"p50_ms": b1.ms_p50, "p95_ms": None, "img_per_s": b1.img_per_s,
                            "source": "raw ONNX Runtime, default session, batch 1"}
    return {"device": "cpu", "date": res.run.started, "models": models}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description="render benchmarks.md from benchmarks.jsonl")
    p.add_argument("--out", type=Path, default=DOCS)
    p.add_argument("--models-json", type=Path, help="write the per-model summary `effnet report --bench` reads, and stop")
    args = p.parse_args(argv)
    if args.models_json:
        args.models_json.write_text(json.dumps(models_json(Results(latest(args.out / "benchmarks.jsonl"))), indent=2) + "\n")
        return 0
    print(*render(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
