"""docs/benchmarks.md (and .png, and the blocks of docs/timeline.md) from the records in docs/benchmarks.jsonl: one
template, a function a section, over the latest run of each benchmark (`make bench` and every `make bench-*`). Every
line is generated except the manual notes, kept from the previous file. The history across sessions is
docs/benchmarks-history.md, kept by hand.

    python -m benchmarks.report [--out docs]   # render again from <out>/benchmarks.jsonl
    python -m benchmarks.report --models-json F  # the latest run's per-model latency for `effnet report --bench F`
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import targets as goals
from benchmarks.harness import DOCS
from benchmarks.records import (BatchTable, Bench, Bursts, ClosedLoop, Footprint, GpuRow, Hops, Latency, LoadWindow,
                                MemoryBurst, OrtTiming, PerfRow, Precision, Probes, Record, Results, Server, Soak, SoakSample,
                                Throughput, append, latest, of, runs)
from benchmarks.targets import GIB, Check, stage_split, targets

NOT_RUN = "Not run.\n"
MANUAL_RE = re.compile(r"<!-- manual -->.*?<!-- /manual -->", re.S)
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
             + (f"; ISA: {m['isa']}" if m.get("isa") else ""),
             f"- **Load**: 1-minute load average {run.loadavg[0]:.2f} at the start, {run.loadavg[1]:.2f} at the end; other "
             f"processes' CPU during the run {others:.0f}% of one core (the machine's busy time less this run's)"
             if len(run.loadavg) == 2 else None,
             f"- **Versions**: Python {m.get('python')}, " + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v),
             f"- **Code**: git {m['git']}" if m.get("git") else None,
             "- **EFFNET_* environment**: " + ", ".join(f"`{k}={v}`" for k, v in sorted(m["effnet_env"].items()))
             if m.get("effnet_env") else None,
             f"- **Models**: {', '.join(run.models)} (random weights: the speed of real ones); matrix: {', '.join(run.full)}; "
             f"loaded in the service: {', '.join(run.loaded)}; repository `{run.repo}`",
             f"- **Method**: everything in one run on one machine, so ratios hold where absolute times drift. Load windows "
             f"{run.window_s:g} s after {run.warmup_s:g} s of warm-up; raw ORT {run.raw_s:g} s per batch size. The load generator "
             "(`benchmarks/loadgen.py`) runs in its own process: N closed-loop clients on keep-alive connections (raw asyncio "
             "streams), each sending its next request when the previous answer is in.",
             "- **Records**: every run's numbers are typed records appended to `benchmarks.jsonl` (`benchmarks/records.py`); "
             "this file renders the latest. What each change bought, session by session: "
             "[benchmarks-history.md](benchmarks-history.md), kept by hand.\n"]
    return "\n".join(notes + [line for line in lines if line])  # None: a line this run has nothing for


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
    bt = next(iter(res.of(BatchTable)), BatchTable("?", "?", {}))
    return (f"*Default session* (the ceiling): `onnxruntime.InferenceSession(path, providers=[\"CPUExecutionProvider\"])` with "
            f"`intra_op_num_threads={run.threads}` (the service's thread count) and nothing else set: ORT's arena per session, "
            f"memory patterns and spinning at their defaults. *Server's session*: `app.engine.sessions.create_session` as the "
            f"server creates it ({run.threads} intra-op threads, inter-op 1, sequential, arena `{run.ort_arena}`, spinning "
            f"{run.ort_spinning}). Random input, `session.run` in a loop, the two sessions of a model alternating (2 turns each) "
            f"at the sizes both run. Cells: img/s / median ms per run.\n\n"
            + table(["model", "px", "GMACs", "default b1", "default b8", *(f"server's b{b}" for b in sizes),
                     "server's ÷ default b1", "server's ÷ default b8", "ORT CPU ms/img, default b1 / b8", "best batch (server's)"], rows)
            + f"\n\nBest batch = the smallest size of the server's session within 3% of its highest throughput. Written to "
            f"`{bt.path}` under `\"{bt.device}\"` (merged with what was there), which the server reads "
            f"at start-up: {json.dumps(bt.written)}. A model measured only at batch 1 and 2 gets an entry only when "
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
        if not (split := stage_split(w)):
            continue
        ort, outside = split
        raw = " / ".join(f(t.cpu_ms_per_img) for b in (1, 8) if (t := res.ort("raw", w.model, "default", b)))
        rows.append([w.model, w.input, w.body, str(w.clients), f(w.server_cpu_ms_per_img), *(f(v) for v in outside.values()),
                     f(sum(outside.values())), f(ort), raw or "–", max(outside, key=outside.__getitem__)])
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


def main_sections(res: Results, precision: list[Record] | None, png: str | None, gpu: bool) -> list[str]:
    checks = targets(res, precision)
    sections = [("Targets (issue 14)", checks_table(checks)),
                ("1. Raw ONNX Runtime: the ceiling (default session) and the server's session", raw_section(res)),
                ("2. The service", service_section(res)),
                ("3. Peers", peers_section(res)),
                ("4. perf_analyzer beside the load generator", perf_section(res)),
                ("5. Memory", memory_section(res)),
                ("6. Throughput and p95 latency vs MACs", f"![throughput and p95 latency vs MACs]({png})\n" if png else NOT_RUN)]
    if not gpu:
        sections.append(("GPU: unmeasured", "`make bench` measures the CPU only (ONNX Runtime providers here: "
                         f"{', '.join(res.run.machine.get('ort_providers', []))}). The GPU figures (`make bench-gpu`: raw ORT CUDA and "
                         "TensorRT, B0/B4/B7 at batch 1..256, the service over gRPC tensors and HTTP JPEGs) need a GPU machine.\n"))
    return [header(res), *(f"## {title}\n\n{body}" for title, body in sections)]


# --- the other benchmarks: a section each, headed by its Bench record ---------------------------------------------
def checks_table(checks: list[Check]) -> str:
    return table(["goal", "status", "numbers"], [[c.goal, f"**{c.status}**", c.numbers] for c in checks]) + "\n"


def gib(b: float, nd: int = 2) -> str:
    return f"{b / goals.BYTES_GIB:.{nd}f}"


def about(b: Bench, what: str) -> str:
    """The line that says how a section's numbers were made."""
    m = b.machine
    quick = "> **Quick (smoke) run**: tiny models and short windows; its numbers mean nothing.\n\n" if b.quick else ""
    return (f"{quick}`{b.command}` (`make bench-{b.name}`)" + (f" on {b.date}" if b.date else "")
            + (f", {b.seconds:.0f} s" if b.seconds else "") + f"; {m.get('cpu')}, {m.get('cores')} cores"
            + (f", {m['isa']}" if m.get("isa") else "")
            + (f"; other processes used {b.others_cpu_pct:.0f}% of one core meanwhile" if b.others_cpu_pct is not None else "")
            + f". {what}\n\n")


def precision_section(b: Bench, recs: list[Record]) -> str:
    rows = of(recs, Precision)
    fp32 = {r.model: r for r in rows if r.precision == "fp32"}
    cells, says = [], []
    for r in rows:
        base, gate = fp32[r.model], r.agreement is not None
        speed = r.img_per_s["1"] / base.img_per_s["1"]
        cells.append([r.model, r.precision, f(r.size_bytes / 1e6), f(r.img_per_s["1"]), f(r.img_per_s["8"]), f"{speed:.2f}×",
                      f"{r.agreement:.1%} of {r.inputs} ({r.images} photos × {r.views} views)" if gate else "–",
                      f"{r.top1}/{r.labelled} (fp32 {r.top1_fp32})" if gate else "–",
                      "–" if r.ships is None else "yes" if r.ships else "**no**: refused"])
        if gate:
            why = ("ships: it passes both gates" if r.ships else f"is refused by `effnet build`: agreement {r.agreement:.1%} < 99%"
                   if (r.agreement or 0) < 0.99 else "is refused by `effnet build`: top-1 on the photos fell")
            says.append(f"- **{r.model} {r.precision}**: {r.size_bytes / base.size_bytes:.0%} of the fp32 file, {speed:.2f}× fp32's "
                        f"speed at batch 1" + (" (slower)" if speed < 0.97 else " (faster)" if speed > 1.03 else "") + f"; it {why}.")
    vnni = "no VNNI" if b.settings.get("reduce_range", True) else "VNNI"
    return (about(b, f"ONNX Runtime {b.settings.get('onnxruntime')}, CPU execution provider. Raw `session.run` speed on the "
                  "server's session settings; agreement = share of inputs whose top-1 class equals fp32's, on the package photos' "
                  "seeded views; top-1 = hits on the labelled package photos.")
            + table(["model", "precision", "file MB", "img/s batch 1", "img/s batch 8", "vs fp32 (b1)", "agreement with fp32",
                     "top-1 on photos", "ships at the 99% gate"], cells)
            + "\n\nWhat this run says (each line computed from the table):\n" + "\n".join(says)
            + "\n- fp16 is meant for the CUDA provider (tensor cores); on the CPU provider ONNX Runtime has few fp16 kernels and "
            "casts around most nodes. int8 gains on CPUs with AVX-512 VNNI or AMX; without them the u8×s8 kernels are not faster "
            "than fp32, and 7-bit weights (`reduce_range`) are needed to avoid their 16-bit saturation, so `effnet build` uses "
            f"7-bit weights only on CPUs without VNNI (this one: {vnni}). The int8 calibration choices were compared once "
            "(docs/benchmarks-history.md).\n- The photo set is small: a view is a different input but not an independent photo. "
            "For a decision that matters, give `--check-data` and `--agreement-data` a few hundred of your own photos.\n")


def soak_section(b: Bench, recs: list[Record]) -> str:
    s, samples = of(recs, Soak)[0], of(recs, SoakSample)
    peak = max([x.rss_kib for x in samples], default=s.end_kib)
    return (about(b, f"`effnet serve` with {', '.join(s.loaded)} loaded; {s.minutes:g} minutes of {s.clients} clients posting a "
                  f"1920×1080 JPEG, in {b.settings.get('segment_s', 30):.0f}-second segments rotating over {', '.join(s.models)}: "
                  f"{s.requests:,} answers ({s.errors} errors). RSS summed over the service's processes.")
            + table(["RSS after warm-up", "at the end", "peak sample", "peak (VmHWM)"],
                    [[f"{s.warm_kib / GIB:.2f} GiB", f"{s.end_kib / GIB:.2f} GiB", f"{peak / GIB:.2f} GiB",
                      f"{s.hwm_kib / GIB:.2f} GiB" if s.hwm_kib else "–"]]) + "\n\n" + checks_table(goals.soak(recs))
            + "\nRSS after each segment (GiB): " + ", ".join(f"{x.rss_kib / GIB:.2f} ({x.model})" for x in samples) + "\n")


def reliability_section(b: Bench, recs: list[Record]) -> str:
    loop = {c.window: c for c in of(recs, ClosedLoop)}
    bu, mem = of(recs, Bursts)[0], of(recs, MemoryBurst)[0]
    probes = [[p.scenario, p.when, "`/health/live`" if p.what == "live" else "a normal request (451×300 JPEG)", str(p.n),
               f(p.p50_ms), f(p.p99_ms), f(p.max_ms)] for p in of(recs, Probes)]
    return (about(b, "The scenarios and clients of `tests/reliability/` (each on its own `effnet serve`), timed: the tests assert "
                  "what holds at any speed (refusals, bounds, nothing lost, every probe answered); these figures depend on the "
                  "machine and on what else runs on it, so they are checked here against the targets the tests used to gate on.")
            + checks_table(goals.reliability(recs)) + "\nProbes one at a time (ms): quiet, then with "
            f"{b.settings.get('stalled_connections', 300)} uploads stalled after their headers (tiny), and during the hostile "
            "/v2 flood (b0).\n\n" + table(["scenario", "when", "probe", "n", "p50", "p99", "max"], probes) + "\n\n"
            + "\n".join(f"- **Storm, {w}**: {c.clients} clients, {c.seconds:g} s: {c.ok} answers 200, {c.refused} refusals, "
                        f"{c.errors} errors; {c.goodput:.1f} img/s, p50 {c.p50_ms} / p99 {c.p99_ms} ms" for w, c in loop.items())
            + f"\n- **Bursts**: {bu.bursts} of 64 accepted (after one warm-up), {bu.accepted} accepted, {bu.refused} refused; p50 "
            f"{bu.p50_ms} ms. Throughput at the admitted concurrency: {bu.rps_before:.0f}/s before, {bu.rps_during:.0f}/s during "
            f"(the server spends most of its time refusing a retry flood), {bu.rps_after:.0f}/s after.\n- **Memory burst**: "
            f"{mem.seconds:g} s; {sum(mem.requests.values())} requests, {sum(mem.attempts.values())} sends with the retries "
            f"{mem.attempts}; final answers {mem.final}; RSS {mem.loaded_mb} MB loaded, {mem.footprint_mb} MB peak after full-batch "
            f"warm-up.\n")


def scaling_section(b: Bench, recs: list[Record]) -> str:
    n = b.settings["workers"]
    cases: dict[str, dict[str, Throughput]] = {}
    for t in of(recs, Throughput):
        cases.setdefault(f"{t.case} ({t.image}) | {t.clients}", {})[t.contender] = t
    rows, ceilings, machine_cores = [], [], b.machine.get("cores") or n
    for case, by in cases.items():
        ls = max([t.img_per_s for k, t in by.items() if k.startswith("LitServe")], default=None)
        one, many, free = (by[k].img_per_s if k in by else None for k in ("service, 1 worker", f"service, {n} workers", "serverless"))
        c1, cn = (by[k].cores if k in by else None for k in ("service, 1 worker", f"service, {n} workers"))
        rows.append([*case.split(" | "), *(f(x, 0) for x in (one, many, ls, free)), ratio(many, one), ratio(many, ls), ratio(many, free),
                     f"{c1:.2f} / {cn:.2f}" if c1 and cn else "–"])
        name = case.split(' (')[0]
        if c1:
            ceilings.append(f"- {name}: one worker already kept {c1:.2f} of the {machine_cores} cores busy (its decode threads and ORT's "
                            f"run beside its event loop), so {n} workers can be at most {machine_cores / c1:.2f}× it on this machine")
        if ls and free:
            ceilings.append(f"- {name}: the same work without a server is {free / ls:.2f}× LitServe here, so no "
                            "server on this machine can be more than that ahead of it")
    return (about(b, f"Images per second, median of {b.settings['rounds']} windows of {b.settings['window_s']:g} s per contender, "
                  "measured in alternating blocks with every other contender frozen (SIGSTOP). Servers run with their defaults.")
            + table(["case", "clients", "service, 1 worker", f"service, {n} workers", "LitServe (best of 1, 2 workers)", "serverless",
                     f"{n} workers / 1", f"{n} workers / LitServe", f"{n} workers / serverless", f"cores busy, 1 / {n} workers"], rows)
            + "\n\n" + checks_table(goals.scaling(recs, n)) + "\n" + "\n".join(ceilings)
            + "\n\nCores busy: the CPU time of every process of the service over the window, divided by its length (HTTP rows; "
            "the load generator's own CPU is not in it).\n\ngRPC rows: the service's V2 gRPC endpoint with ready FP32 tensors, by Triton's perf_analyzer (batch 1, the "
            "clients column is its concurrency); LitServe and the serverless pipeline take JPEGs only.\n\n"
            f"Threads, as the service splits them by default with {n} workers: the engine's ONNX Runtime intra-op pool gets "
            f"EFFNET_THREADS = the cores ({b.machine.get('cores')}); each worker decodes with cores / workers threads (at least "
            "1) beside its event loop. That is the serverless pipeline's split (a default ORT session, which takes every core, "
            "beside a decode pool the size of the machine): decode and inference take turns on the same cores rather than each "
            "owning a fixed part of them, because the share each needs depends on the model (the tiny model is almost all front "
            "end, b4 almost all inference). EFFNET_THREADS and EFFNET_DECODE_WORKERS override either side.\n")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def memory_default_section(b: Bench, recs: list[Record]) -> str:
    rows, fp = [], of(recs, Footprint)
    for w in dict.fromkeys(r.workers for r in fp):
        at = {(r.when, r.process): r for r in fp if r.workers == w}
        for proc in [*dict.fromkeys(p for _, p in at), "**all**"]:
            cells = []
            for when in ("ready", "peak", "after"):
                mine = [r for (wh, p), r in at.items() if wh == when and proc in (p, "**all**")]
                pss, rss = gib(sum(r.pss for r in mine)), gib(sum(r.rss for r in mine))
                cells.append(f"**{pss}** ({rss})" if proc == "**all**" else f"{pss} ({rss})")
            rows.append([str(w), proc, *cells])
    return (about(b, "A repository of b0..b7 only (random weights, no batch table), every setting at its default; a burst of "
                  f"{b.settings.get('burst', 32)} concurrent requests with a 1000×750 JPEG on each model in turn. PSS summed over "
                  "every process of the service (shared pages counted once), GiB; RSS in brackets.")
            + table(["workers", "process", "at ready", "peak during the bursts", "5 s after"], rows) + "\n\n"
            + checks_table(goals.memory_default(recs))
            + "\nThe peak is the bursts' own: b7 at batch 8 (600 px) holds its activations and ONNX Runtime's memory pattern "
            "block while it runs; the last batch of a burst gives them back (EFFNET_ORT_SHRINK_MB, app/engine/sessions.py). "
            "EFFNET_MAX_BATCH_B7=1 lowers the peak at some cost in b7's throughput.\n")


QUIET_NAMES = ["service", "service, no spinning", "service, 1 process", "LitServe, 1 worker", "serverless"]


def quiet_section(b: Bench, recs: list[Record]) -> str:
    lat = {(r.model, r.case, r.contender): r for r in of(recs, Latency)}
    rows, spin = [], []
    for model, case in dict.fromkeys((r.model, r.case) for r in lat.values()):
        on, off = lat.get((model, case, "service")), lat.get((model, case, "service, no spinning"))
        if case == "http 32":
            spin.append(f"- {model}: spinning within runs {on and on.img_per_s}, off {off and off.img_per_s} "
                        f"({ratio(on and on.img_per_s, off and off.img_per_s)})")
            continue
        cells = [f"{f(r.p50_ms)} / {f(r.p99_ms)}" if (r := lat.get((model, case, n))) else "–" for n in QUIET_NAMES]
        free = lat.get((model, case, "serverless"))
        rows.append([model, f"{case} client" + "s" * (not case.endswith(" 1")), *cells, ratio(on and on.p50_ms, free and free.p50_ms)])
    return (about(b, f"Median of {b.settings['rounds']} windows of {b.settings['window_s']:g} s per contender, in alternating blocks "
                  f"with every other contender frozen (SIGSTOP). `service` is the default ({b.settings['workers']} workers, ORT "
                  "spinning within runs: `EFFNET_ORT_SPINNING=auto`); the serverless pipeline decodes the same JPEG with Pillow and "
                  "runs a default ONNX Runtime session in one process (gRPC rows: the tensor only), N images side by side then one "
                  "batch of N.")
            + table(["model", "case", *(f"{n} p50 / p99 ms" for n in QUIET_NAMES), "service / serverless (p50)"], rows)
            + "\n\nSpinning under load (32 clients, images per second):\n\n" + "\n".join(spin)
            + "\n\nGoals (issue 27):\n\n" + checks_table(goals.quiet(recs)))


def gpu_section(b: Bench, recs: list[Record]) -> str:
    s, rows = b.settings, of(recs, GpuRow)
    notes = ([f"**No CUDA: {s['no_cuda']}.** The rows that need it say n/a; the others ran on the CPU."] if s.get("no_cuda") else [])
    notes += [f"Missing (the rows that need them say n/a): {', '.join(s['missing'])}."] if s.get("missing") else []
    notes += [f"pip could not install {', '.join(s['pip_failed'])}."] if s.get("pip_failed") else []
    return (about(b, f"GPU {s.get('gpu') or 'none'}; onnxruntime {s.get('onnxruntime')} ({', '.join(s.get('providers', []))}); "
                  f"gRPC: {s.get('concurrency')} requests in flight; {s.get('block'):g} s per measurement. " + " ".join(notes))
            + table(["model", "path", "device", "batch / clients", "img/s", "p50 ms", "note"],
                    [[r.model, r.path, r.device, r.load, f(r.img_per_s, 0), f(r.p50_ms), r.note] for r in rows]) + "\n\n"
            + checks_table(goals.gpu(rows, s.get("goal_model", rows[0].model if rows else "?"), s.get("goal_path", "raw ORT CUDA"))))


def timeline_block(b: Bench, recs: list[Record]) -> str:
    layouts = of(recs, Hops)
    s = b.settings
    rows = [["**total (client)**" if h == "total" else h, *(f(x.median_ms[h], 2) for x in layouts)]
            for h in [*layouts[0].median_ms]] if layouts else []
    rows.append(["total without tracing", *(f(x.untraced_median_ms, 2) for x in layouts)])
    return (f"<!-- timeline-{b.label} -->\n### {b.label.capitalize()}\n\n" + about(b, f"{s.get('rounds')} alternating blocks of "
            f"{s.get('requests')} requests per layout; medians in ms.") + table(["hop", *(x.layout for x in layouts)], rows)
            + "\n\nEach hop's median is taken on its own, so the hops need not add up to the total's median.\n"
            f"<!-- /timeline-{b.label} -->")


SECTIONS = {"precision": ("fp16 and int8 copies (`effnet build --precision`)", precision_section),
            "soak": ("Memory over a long burst (`make bench-soak`)", soak_section),
            "reliability": ("Reliability scenarios: speeds (`make bench-reliability`)", reliability_section),
            "scaling": ("Worker processes: scaling beside the peers", scaling_section),
            "memory": ("Memory with b0..b7 loaded (default settings)", memory_default_section),
            "quiet": ("Latency when the service is quiet", quiet_section),
            "gpu": ("GPU (`make bench-gpu`)", gpu_section)}


def section(recs: list[Record]) -> str:
    """One benchmark's section (or, for the timeline, its block of docs/timeline.md)."""
    b = next(r for r in recs if isinstance(r, Bench))
    if b.name == "timeline":
        return timeline_block(b, recs)
    title, body = SECTIONS[b.name]
    return f"## {title}\n\n{body(b, recs)}"


def write_block(path: Path, name: str, block: str) -> None:
    """`block` in place of the one between the same markers in `path`, else at its end."""
    text = path.read_text() if path.is_file() else "# One request's time, hop by hop\n"
    marker = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    path.write_text(marker.sub(lambda _: block, text) if marker.search(text) else text.rstrip("\n") + "\n\n" + block + "\n")


def render(out: Path) -> list[Path]:
    """benchmarks.md (and .png) in `out` from the latest run of each benchmark in its benchmarks.jsonl, the manual notes of
    the old .md kept; the timeline's blocks into timeline.md."""
    from benchmarks.report_plot import plot

    latest_runs = runs(out / "benchmarks.jsonl")
    md, png = out / "benchmarks.md", out / "benchmarks.png"
    parts, written = [], [md]
    if "run" in latest_runs:
        res = Results(latest_runs["run"])
        if plotted := plot(png, res):
            written.append(png)
        parts += main_sections(res, latest_runs.get("precision"), png.name if plotted else None, "gpu" in latest_runs)
    parts += [section(latest_runs[name]) for name in SECTIONS if name in latest_runs]
    for key in (k for k in latest_runs if k.startswith("timeline-")):
        write_block(out / "timeline.md", key, section(latest_runs[key]))
        written.append(out / "timeline.md")
    kept = MANUAL_RE.search(md.read_text() if md.is_file() else "")
    md.write_text("\n".join(["# Benchmarks\n", "<!-- Written by `python -m benchmarks.report` (every `make bench*` runs it) from "
                             "the latest run of each benchmark in benchmarks.jsonl. Edits outside the manual markers are "
                             "overwritten. -->\n", *parts, kept.group(0) if kept else "<!-- manual -->\n<!-- /manual -->", ""]))
    return list(dict.fromkeys(written))


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
