"""docs/benchmarks.{md,json,png} from one run's results. Everything in the Markdown is generated,
except what sits between `<!-- manual -->` and `<!-- /manual -->` in the previous file, which is kept."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

GIB = 1024 * 1024  # KiB per GiB
MANUAL_RE = re.compile(r"<!-- manual -->.*?<!-- /manual -->", re.S)
# Blocks other benchmark scripts own (benchmarks.precision, benchmarks.soak): kept as they are.
OWNED_NAMES = ("precision", "soak")
OWNED_BLOCKS = [re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S) for name in OWNED_NAMES]


def write_owned_block(md_path: Path, name: str, block: str) -> None:
    """Put `block` (wrapped in <!-- name --> markers) into benchmarks.md: in place of the old one,
    else before the manual notes. Lets a separate benchmark script own its section."""
    block_re = OWNED_BLOCKS[OWNED_NAMES.index(name)]
    text = md_path.read_text() if md_path.is_file() else ""
    if block_re.search(text):
        text = block_re.sub(lambda _: block, text)
    elif "<!-- manual -->" in text:
        text = text.replace("<!-- manual -->", block + "\n\n<!-- manual -->", 1)
    else:
        text += "\n" + block + "\n"
    md_path.write_text(text)

# The targets (issue 5), as numbers.
SERVICE_VS_RAW = 0.90
SERVICE_VS_NAIVE = 3.0
P50_SLACK_MS = 3.0
PREP_SPEEDUP = 3.0
RSS_LIMIT_GIB = 2.5
RSS_DRIFT = 0.10


def machine_info() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or "unknown"
    try:
        info["cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores"] = os.cpu_count()
    try:
        mem = Path("/proc/meminfo").read_text()
        info["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", mem).group(1)) / GIB, 1)
    except (OSError, AttributeError):
        pass
    versions = {}
    for pkg in ("onnxruntime", "numpy", "pillow", "torch", "fastapi", "uvicorn", "starlette", "onnx"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    for pkg in ("uvloop", "httptools"):  # uvicorn's fast paths; without them it runs asyncio + h11
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    info["versions"] = versions
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        info["git"] = rev.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    env = {k: v for k, v in os.environ.items() if k.startswith("EFFNET_")}
    if env:
        info["effnet_env"] = env
    return info


# --- helpers --------------------------------------------------------------------------
def _f(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(?:[×%]| / [\d,.]+)?(?: \(.*\))?$|^–$")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; columns whose every cell is a number are right-aligned."""
    numeric = [bool(rows) and all(_NUMERIC.match(r[i].strip("*")) for r in rows) for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _row(rows: list[dict], model: str, kind: str, n: int) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["input"] == kind and r["concurrency"] == n), None)


def _best(rows: list[dict], model: str, kind: str) -> dict | None:
    cands = [r for r in rows if r["model"] == model and r["input"] == kind and r.get("img_per_s")]
    return max(cands, key=lambda r: r["img_per_s"]) if cands else None


def _gib(kib: int | None) -> float | None:
    return None if kib is None else kib / GIB


# --- targets ----------------------------------------------------------------------------
def targets(plan, results: dict) -> list[dict]:
    raw = results.get("raw", {})
    service = results.get("service")
    naive = results.get("naive")
    prep = (results.get("prep") or {}).get("models", {})
    memory = results.get("memory")
    full = plan.full
    out: list[dict] = []

    def add(target: str, status: str, detail: str) -> None:
        out.append({"target": target, "status": status, "detail": detail})

    def pick(preferred: list[str]) -> list[str]:
        chosen = [m for m in preferred if m in full]
        return chosen or full[:1] if plan.quick else chosen

    # 1. >= 90% of raw ORT at the best batch, 32 clients, model-resolution images.
    top_n = max(plan.concurrency)
    for m in pick(["b0", "b4"]) or ["b0", "b4"]:
        r = _row(service or [], m, "model-res", top_n)
        rw = raw.get(m)
        if r is None or rw is None or not r.get("img_per_s"):
            add(f"{m}: service at {top_n} clients ≥ {SERVICE_VS_RAW:.0%} of raw ORT (model-resolution images)", "unmeasured",
                "not in this run")
            continue
        ref = rw["batches"][str(rw["best_batch"])]["img_per_s"]
        ratio = r["img_per_s"] / ref
        add(f"{m}: service at {top_n} clients ≥ {SERVICE_VS_RAW:.0%} of raw ORT (model-resolution images)",
            "met" if ratio >= SERVICE_VS_RAW else "missed",
            f"{r['img_per_s']:.1f} vs {ref:.1f} img/s at batch {rw['best_batch']} = {ratio:.0%}")
    # 2. Best batch sizes found and written.
    bs = results.get("batch_sizes")
    if bs:
        written = bs["written"]
        add("best batch size per model found and written where the server reads it",
            "met" if all(m in written for m in full) else "missed",
            f"{', '.join(f'{k}: {v}' for k, v in sorted(written.items()))} → `{Path(bs['path']).name}` under \"{bs['device']}\"")
    else:
        add("best batch size per model found and written where the server reads it", "unmeasured", "raw phase not run")
    # 3. >= 3x naive on b0 photos.
    for m in pick(["b0"]) or ["b0"]:
        s, n = _best(service or [], m, "photo"), _best(naive or [], m, "photo")
        if s is None or n is None:
            add(f"{m}: ≥ {SERVICE_VS_NAIVE:g}× the naive baseline on 1920×1080 photos", "unmeasured", "not in this run")
            continue
        ratio = s["img_per_s"] / n["img_per_s"]
        add(f"{m}: ≥ {SERVICE_VS_NAIVE:g}× the naive baseline on 1920×1080 photos",
            "met" if ratio >= SERVICE_VS_NAIVE else "missed",
            f"{s['img_per_s']:.1f} img/s ({s['concurrency']} clients) vs naive {n['img_per_s']:.1f} ({n['concurrency']} clients) = {ratio:.1f}×")
    # 4. p50 at 1 client <= raw batch-1 latency + 3 ms (+ decode for photos).
    for m in full:
        rw = raw.get(m)
        for kind in ("model-res", "photo"):
            r = _row(service or [], m, kind, 1)
            name = f"{m}: p50 at 1 client ≤ raw batch-1 latency + {P50_SLACK_MS:g} ms" + (" + decode" if kind == "photo" else "") + f" ({kind})"
            if r is None or rw is None or "1" not in rw["batches"] or r.get("p50_ms") is None:
                add(name, "unmeasured", "not in this run")
                continue
            # Raw batch-1 measured right before this window where the run did so, else phase 1's.
            raw_ms = r.get("raw_b1_ms_adjacent") or rw["batches"]["1"]["batch_ms_p50"]
            raw_note = " (raw measured just before)" if r.get("raw_b1_ms_adjacent") else ""
            limit = raw_ms + P50_SLACK_MS
            extra = ""
            if kind == "photo":
                dec = (prep.get(m) or {}).get("ours_ms")
                if dec is None:
                    add(name, "unmeasured", "preprocessing not measured")
                    continue
                limit += dec
                extra = f" + decode {dec:.1f}"
            add(name, "met" if r["p50_ms"] <= limit else "missed",
                f"{r['p50_ms']:.1f} ms vs {raw_ms:.1f} + {P50_SLACK_MS:g}{extra} = {limit:.1f} ms{raw_note}")
    # 5. Decode + resize >= 3x faster than plain PIL.
    for m in pick(["b0"]) or ["b0"]:
        p = prep.get(m)
        if p is None:
            add(f"decode + resize of a 1920×1080 JPEG ≥ {PREP_SPEEDUP:g}× faster than plain PIL ({m})", "unmeasured", "not in this run")
            continue
        add(f"decode + resize of a 1920×1080 JPEG ≥ {PREP_SPEEDUP:g}× faster than plain PIL ({m})",
            "met" if p["speedup"] >= PREP_SPEEDUP else "missed",
            f"{p['ours_ms']:.1f} ms vs {p['plain_ms']:.1f} ms = {p['speedup']:.1f}×")
    # 6. Memory.
    if memory and memory.get("after_burst"):
        peak = max(memory["idle"]["VmRSS"], memory["warm"]["VmRSS"], memory["after_burst"]["VmRSS"])
        missing = [m for m in (f"b{i}" for i in range(8)) if m not in memory["models"]]
        name = f"all of b0..b7 loaded: ≤ {RSS_LIMIT_GIB:g} GiB RSS"
        if missing and not plan.quick:
            add(name, "unmeasured", f"{', '.join(missing)} not loaded; {_gib(peak):.2f} GiB with {', '.join(memory['models'])}")
        else:
            add(name, "met" if _gib(peak) <= RSS_LIMIT_GIB else "missed",
                f"{_gib(peak):.2f} GiB with {', '.join(memory['models'])} (highest of idle, warm, after load)")
        warm, after = memory["warm"]["VmRSS"], memory["after_burst"]["VmRSS"]
        drift = after / warm - 1.0
        add(f"RSS after a burst within {RSS_DRIFT:.0%} of after warm-up",
            "met" if abs(drift) <= RSS_DRIFT else "missed",
            f"{_gib(after):.2f} vs {_gib(warm):.2f} GiB = {drift:+.1%} after {memory['burst_s']:.0f} s of load; the 10-minute burst is `make bench-soak`, in its own section below")
    else:
        add(f"all of b0..b7 loaded: ≤ {RSS_LIMIT_GIB:g} GiB RSS", "unmeasured", "service phase not run")
        add(f"RSS after a burst within {RSS_DRIFT:.0%} of after warm-up", "unmeasured", "service phase not run")
    return out


# --- the report -------------------------------------------------------------------------
def write(plan, meta: dict, manifests: dict, results: dict) -> list[Path]:
    out = plan.out
    md_path, json_path, png_path = out / "benchmarks.md", out / "benchmarks.json", out / "benchmarks.png"
    tgt = targets(plan, results)
    summary = models_summary(manifests, results)
    data = {"meta": meta, "command": command(plan), "quick": plan.quick, "plan": {
        "models": plan.models, "full_matrix": plan.full, "memory_models": plan.memory, "phases": plan.phases,
        "concurrency": plan.concurrency, "service_window_s": plan.load_s, "naive_window_s": plan.naive_s,
        "warmup_s": plan.warmup_s, "raw_seconds_per_batch": plan.raw_s, "naive_threads": plan.naive_threads,
        "repository": str(plan.repo)},
        "models": summary, "targets": tgt, **results,
        "manifests": {k: {"macs": v.get("macs"), "params": v.get("params"), "resolution": v["preprocess"]["crop"]}
                      for k, v in manifests.items()}}
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    plotted = plot(png_path, plan, manifests, results)
    previous = md_path.read_text() if md_path.is_file() else ""
    m = MANUAL_RE.search(previous)
    manual = m.group(0) if m else "<!-- manual -->\n<!-- /manual -->"
    for block_re in reversed(OWNED_BLOCKS):
        if block := block_re.search(previous):
            manual = block.group(0) + "\n\n" + manual
    md_path.write_text(markdown(plan, meta, manifests, results, tgt, plotted, png_path.name, manual))
    return [md_path, json_path] + ([png_path] if plotted else [])


def _overhead_rows(service: list[dict]) -> list[list[str]]:
    rows = []
    for r in service:
        t, raw = r.get("server_timing_ms") or {}, r.get("raw_b1_ms_adjacent")
        if r["concurrency"] != 1 or raw is None or not t.get("total") or r.get("p50_ms") is None:
            continue
        stages = sum(t.get(k, 0.0) for k in ("decode", "preprocess", "queue", "inference"))
        rows.append([r["model"], r["input"], _f(r["p50_ms"]), _f(raw), _f(r["p50_ms"] - raw), _f(t.get("decode")),
                     _f(t.get("preprocess")), _f(t.get("queue")), _f(t.get("inference", 0.0) - raw),
                     _f(t["total"] - stages), _f(r["p50_ms"] - t["total"])])
    return rows


def command(plan) -> str:
    return " ".join(["python -m benchmarks.run", *plan.argv]).strip()


def models_summary(manifests: dict, results: dict) -> dict:
    """Per model: p50/p95 at 1 client and the best throughput, on 1920x1080 photos (raw ORT batch 1 where
    the service did not run the model). Read by the accuracy report."""
    out = {}
    service = results.get("service") or []
    for name, rw in (results.get("raw") or {}).items():
        entry: dict[str, Any] = {"macs": manifests.get(name, {}).get("macs"), "resolution": rw.get("resolution")}
        one, best = _row(service, name, "photo", 1), _best(service, name, "photo")
        if one and best:
            entry.update(p50_ms=one["p50_ms"], p95_ms=one["p95_ms"], img_per_s=best["img_per_s"],
                         source=f"service, 1920x1080 JPEG; latency at 1 client, throughput at {best['concurrency']} clients")
        elif "1" in rw["batches"]:
            b1 = rw["batches"]["1"]
            entry.update(p50_ms=b1["batch_ms_p50"], p95_ms=None, img_per_s=b1["img_per_s"], source="raw ONNX Runtime, batch 1")
        entry["raw_b1_img_per_s"] = rw["batches"].get("1", {}).get("img_per_s")
        entry["best_batch"] = rw.get("best_batch")
        out[name] = entry
    return out


def plot(path: Path, plan, manifests: dict, results: dict) -> bool:
    raw, service, naive = results.get("raw") or {}, results.get("service") or [], results.get("naive") or []
    if not raw and not service:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({*raw, *(r["model"] for r in service)}, key=lambda n: manifests[n]["macs"])
    macs = {n: manifests[n]["macs"] / 1e9 for n in names}
    top_n = max(plan.concurrency)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))

    def series(ax, label, fn, style):
        pts = [(macs[n], v) for n in names if (v := fn(n)) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, style, label=label)
            for n in names:
                v = fn(n)
                if v is not None and style.startswith("o"):
                    ax.annotate(n, (macs[n], v), textcoords="offset points", xytext=(4, 4), fontsize=8)

    def raw_ips(n, b=None):
        r = raw.get(n)
        if not r:
            return None
        b = str(r["best_batch"]) if b is None else b
        return r["batches"].get(b, {}).get("img_per_s")

    def svc(n, kind, conc, key, rows=service):
        r = _row(rows, n, kind, conc)
        return r.get(key) if r else None

    series(ax1, "raw ORT, best batch", lambda n: raw_ips(n), "k--s")
    series(ax1, "raw ORT, batch 1", lambda n: raw_ips(n, "1"), "k:^")
    series(ax1, f"service, {top_n} clients, model-res", lambda n: svc(n, "model-res", top_n, "img_per_s"), "o-")
    series(ax1, f"service, {top_n} clients, 1920×1080", lambda n: svc(n, "photo", top_n, "img_per_s"), "s-")
    series(ax1, f"naive, {top_n} clients, 1920×1080", lambda n: svc(n, "photo", top_n, "img_per_s", naive), "x-.")
    ax1.set(xscale="log", yscale="log", xlabel="GMACs per image", ylabel="images / s", title="Throughput")
    series(ax2, "service, 1 client, 1920×1080", lambda n: svc(n, "photo", 1, "p95_ms"), "o-")
    series(ax2, f"service, {top_n} clients, 1920×1080", lambda n: svc(n, "photo", top_n, "p95_ms"), "s-")
    series(ax2, "naive, 1 client, 1920×1080", lambda n: svc(n, "photo", 1, "p95_ms", naive), "x-.")
    series(ax2, f"naive, {top_n} clients, 1920×1080", lambda n: svc(n, "photo", top_n, "p95_ms", naive), "+:")
    ax2.set(xscale="log", yscale="log", xlabel="GMACs per image", ylabel="p95 latency, ms", title="p95 latency")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(("QUICK (smoke) run - " if plan.quick else "") + "EfficientNet serving on CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(plan, meta: dict, manifests: dict, results: dict, tgt: list[dict], plotted: bool, png: str, manual: str) -> str:
    L: list[str] = []
    add = L.append
    v = meta.get("versions", {})
    add("# Benchmarks\n")
    add("<!-- Written by `python -m benchmarks.run` (make bench). Edits outside the manual markers are overwritten. -->\n")
    if plan.quick:
        add("> **Quick (smoke) run**: tiny custom models and ~1 s windows. It checks that the benchmark works; "
            "its numbers mean nothing.\n")
    add(f"- **Command**: `{command(plan)}`")
    add(f"- **Date**: {meta.get('started')} → {meta.get('finished')} (measured run {meta.get('run_s', 0):.0f} s; "
        f"building missing models beforehand {meta.get('build_s', 0):.0f} s)")
    add(f"- **Machine**: {meta.get('cpu')}, {meta.get('cores')} cores, {meta.get('memory_gib')} GiB RAM; {meta.get('platform')}")
    la0, la1 = meta.get("loadavg_start"), meta.get("loadavg_end")
    if la0 and la1:
        add(f"- **Load average** (1 min) at start / end: {la0[0]:.2f} / {la1[0]:.2f} — above ~0.5 something else shared the cores")
    add(f"- **Versions**: Python {meta.get('python')}, " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    if meta.get("git"):
        add(f"- **Code**: git {meta['git']}")
    if meta.get("effnet_env"):
        add("- **EFFNET_* environment**: " + ", ".join(f"`{k}={val}`" for k, val in sorted(meta["effnet_env"].items())))
    add(f"- **Models**: {', '.join(plan.models)} (random weights: the speed of real ones); full matrix: {', '.join(plan.full)}; "
        f"loaded in the service: {', '.join(plan.memory)}; repository `{plan.repo}`")
    add(f"- **Method**: everything in one run on one machine, so ratios hold where absolute times drift. "
        f"Service windows {plan.load_s:g} s and naive windows {plan.naive_s:g} s after {plan.warmup_s:g} s of warm-up; raw ORT "
        f"{plan.raw_s:g} s per batch size. The load generator (`benchmarks/loadgen.py`) runs in its own process: N closed-loop "
        f"clients on keep-alive connections (raw asyncio streams), each sending its next request when the previous answer is in.\n")

    add("## Targets (issue 5)\n")
    add(_table(["target", "status", "numbers"], [[t["target"], f"**{t['status']}**", t["detail"]] for t in tgt]))
    add("")

    # 1. raw
    add("## 1. Raw ONNX Runtime\n")
    raw = results.get("raw")
    if raw:
        first = next(iter(raw.values()))
        add(f"`onnxruntime.InferenceSession` created by `app.engine.sessions.create_session` exactly as the server creates it "
            f"({first['provider']}, {first['threads']} intra-op threads, spinning {'on' if first['spinning'] else 'off'}), "
            f"random input, `session.run` in a loop. Latency is the median time of one run.\n")
        sizes = sorted({int(b) for r in raw.values() for b in r["batches"]})
        rows = []
        for n, r in raw.items():
            cells = [n, str(r["resolution"]), _f(manifests[n]["macs"] / 1e9, 2)]
            for b in sizes:
                x = r["batches"].get(str(b))
                cells.append("–" if x is None else f"{x['img_per_s']:.1f} / {x['batch_ms_p50']:.1f}")
            cells.append(f"{r['best_batch']}" + ("" if r["best_batch_written"] else " (not written)"))
            rows.append(cells)
        add(_table(["model", "px", "GMACs"] + [f"batch {b}: img/s / ms per run" for b in sizes] + ["best batch"], rows))
        bs = results.get("batch_sizes") or {}
        add(f"\nBest batch = the smallest size within 3% of the highest throughput (less latency for the same work). "
            f"Written to `{bs.get('path')}` under `\"{bs.get('device')}\"` (merged with what was there), which the server reads at "
            f"start-up: {json.dumps(bs.get('written', {}))}. A model measured only at batch 1 and 2 gets an entry only "
            f"when batch 2 is already slower.\n")
    else:
        add("Not run.\n")

    # 2. service
    add("## 2. The service\n")
    service = results.get("service")
    if service:
        add(f"`effnet serve` (subprocess, 127.0.0.1) with {', '.join(results['memory']['models'])} loaded, default `EFFNET_*` "
            f"settings and the batch table above; max batch per model as the server reported it: "
            f"{json.dumps(results['memory'].get('max_batch', {}))}. Inputs: a JPEG already at the model's resolution "
            f"(model-res) and a 1920×1080 JPEG photo, quality 90 "
            f"({next((r['body_bytes'] for r in service if r['input'] == 'photo'), 0) // 1024} KiB).\n")
        add(_service_table(service, with_server=True))
        add("\n*mean batch*: images per inference run from the server's `effnet_batch_size` histogram (window and warm-up); "
            "*server CPU*: the server process's CPU time over the window, in % of one core and per image; "
            "*loadgen CPU*: the load generator's own CPU time in % of one core (it shares the cores with the server). "
            "*stages*: mean of the `timing_ms` the server returns (decode+preprocess / queue / inference), sampled from every 10th answer.\n")
        overhead = _overhead_rows(service)
        if overhead:
            add("Where the time over raw ORT goes at 1 client (ms; the server's own `timing_ms`, mean of sampled answers; "
                "*in handler, other*: thread hops, softmax/top-k, building the answer; *outside handler*: HTTP, "
                "the load generator, the network stack):\n")
            add(_table(["model", "input", "p50", "raw batch 1", "over raw", "decode", "preprocess", "queue",
                        "inference − raw", "in handler, other", "outside handler"], overhead))
            add("")
    else:
        add("Not run.\n")

    # 3. naive
    add("## 3. The naive baseline\n")
    naive = results.get("naive")
    if naive:
        add("`benchmarks/naive_server.py`: a FastAPI endpoint a user writes by hand — Pillow decodes the whole JPEG, "
            "resizes the whole image, crops; PyTorch eager (`build.efficientnet.EfficientNet`, torchvision's graph) at batch 1 "
            f"per request under `torch.inference_mode()`, {'PyTorch default threads' if not plan.naive_threads else f'{plan.naive_threads} torch thread(s)'}, "
            "inside the `async def` handler. "
            "Same inputs, same clients, same load generator.\n")
        add(_service_table(naive, with_server=False))
        add("")
        if service:
            rows = []
            for m in plan.full:
                for kind in ("model-res", "photo"):
                    s, n = _best(service, m, kind), _best(naive, m, kind)
                    if s and n:
                        rows.append([m, kind, _f(s["img_per_s"]), _f(n["img_per_s"]), f"{s['img_per_s'] / n['img_per_s']:.1f}×"])
            add("Best throughput over N, service vs naive:\n")
            add(_table(["model", "input", "service img/s", "naive img/s", "ratio"], rows))
            add("")
    else:
        add("Not run.\n")

    # 4. preprocessing
    add("## 4. Preprocessing alone\n")
    prep = results.get("prep")
    if prep:
        add(f"One 1920×1080 JPEG (quality 90, {prep['photo_bytes'] // 1024} KiB), median of {next(iter(prep['models'].values()))['reps']} "
            f"runs in one thread. *plain*: `Image.open().convert('RGB')`, resize the whole image (shorter side → resize), "
            f"crop, ToTensor + Normalize — torchvision's eval transform, the reference. *ours*: `app.engine.preprocess.prepare(draft=True)`, "
            f"the service's path (DCT-domain draft decode when the target is small enough, resize of the crop box only). "
            f"Difference: mean |ours − reference| in normalised units.\n")
        rows = []
        for m, p in prep["models"].items():
            rows.append([m, f"{p['resize']}→{p['crop']}", _f(p["plain_decode_ms"]), _f(p["plain_ms"]), _f(p["ours_ms"]),
                         f"{p['speedup']:.1f}×", "×".join(map(str, p["ours_decoded_size"])), _f(p["ours_nodraft_ms"]),
                         f"{p['mean_abs_diff']:.4f}", f"{p['mean_abs_diff_nodraft']:.4f}"])
        add(_table(["model", "resize→crop", "plain decode ms", "plain total ms", "ours ms", "speed-up", "ours decodes at",
                    "ours, no draft, ms", "diff (draft)", "diff (no draft)"], rows))
        add("")
    else:
        add("Not run.\n")

    # 5. memory
    add("## 5. Memory\n")
    mem = results.get("memory")
    if mem and mem.get("after_burst"):
        add(f"VmRSS of the `effnet serve` process (from `/proc/<pid>/status`) with {', '.join(mem['models'])} loaded "
            f"(ready after {mem['ready_s']:.0f} s, each session warmed at its batch sizes).\n")
        rows = [["idle, just ready", _f(_gib(mem["idle"]["VmRSS"]), 2)],
                [f"after warm-up ({mem['warmup_s']:.0f} s: 8 clients of photos on every model)", _f(_gib(mem["warm"]["VmRSS"]), 2)],
                [f"after {mem['burst_s']:.0f} s of load (the matrix above, then {plan.burst_s:g} s of 8 clients on every other model)",
                 _f(_gib(mem["after_burst"]["VmRSS"]), 2)],
                ["peak (VmHWM)", _f(_gib(mem["after_burst"]["VmHWM"]), 2)]]
        add(_table(["when", "RSS GiB"], rows))
        if naive:
            rss = {r["model"]: r.get("server_rss_kib") for r in naive}
            add("\nFor comparison, the naive server with one model loaded, after its load: "
                + ", ".join(f"{m} {_gib(k):.2f} GiB" for m, k in rss.items() if k) + ".")
        add("")
    else:
        add("Not run.\n")

    # 6. plot
    add("## 6. Throughput and p95 latency vs MACs\n")
    if plotted:
        add(f"![throughput and p95 latency vs MACs]({png})\n")
    else:
        add("Not run.\n")

    add("## GPU: unmeasured (no GPU lent to this session)\n")
    add("The CUDA execution provider table (b0..b7, batch 1 and 32, fp32 and fp16) is added when a run has a GPU.\n")
    add(manual)
    add("")
    return "\n".join(L)


def _service_table(rows: list[dict], with_server: bool) -> str:
    header = ["model", "input", "N", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
    if with_server:
        header += ["mean batch", "stages ms", "server CPU %", "CPU ms/img"]
    header += ["loadgen CPU %"]
    body = []
    for r in rows:
        cells = [r["model"], r["input"], str(r["concurrency"]), _f(r["img_per_s"]), _f(r["p50_ms"]), _f(r["p95_ms"]),
                 _f(r["p99_ms"]), str(r["errors"]) + (f" (+{r['unfinished']} unfinished)" if r.get("unfinished") else "")]
        if with_server:
            t = r.get("server_timing_ms") or {}
            stages = "/".join(_f(x) for x in ((t.get("decode", 0) + t.get("preprocess", 0)) if t else None,
                                                t.get("queue"), t.get("inference")))
            cells += [_f(r.get("mean_batch"), 2), stages, _f(r.get("server_cpu_pct"), 0), _f(r.get("server_cpu_ms_per_img"))]
        cells.append(_f(r.get("loadgen_cpu_pct"), 0))
        body.append(cells)
    return _table(header, body)
