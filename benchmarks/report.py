"""docs/benchmarks.{md,json,png} from one run's results. Everything in the Markdown is generated, except what
sits between `<!-- manual -->` and `<!-- /manual -->` in the previous file and the blocks other benchmark scripts
own (`<!-- precision -->`, `<!-- soak -->`), which are kept. Sections: benchmarks.report_tables; targets and
"what each change bought": benchmarks.report_targets; the plot: benchmarks.report_plot."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import report_tables as T
from benchmarks.harness import DOCS
from benchmarks.report_plot import plot
from benchmarks.report_targets import GIB, bought, row, targets

MANUAL_RE = re.compile(r"<!-- manual -->.*?<!-- /manual -->", re.S)
# Blocks other benchmark scripts own (benchmarks.precision, benchmarks.soak, benchmarks.reliability): kept as they are.
OWNED_NAMES = ("precision", "soak", "reliability", "scaling", "quiet", "memory")
OWNED_BLOCKS = [re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S) for name in OWNED_NAMES]
CONTENDED_PCT = 20.0  # other processes' CPU during the run, % of one core, above which the doc says so


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

def block_main(name: str, run: Callable[[argparse.Namespace], dict], render: Callable[[dict], str],
               window_s: float, rounds: int = 2) -> None:
    """The command line of a benchmark that owns a block of docs/benchmarks.md (and docs/benchmarks-NAME.json):
    a run (or --quick: a smoke run into --out or stdout, never docs/), or --render from the saved JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON and the block (default: docs/)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--window", type=float, default=None)
    p.add_argument("--render", action="store_true", help=f"rewrite the block from docs/benchmarks-{name}.json only")
    plan = p.parse_args()
    if plan.render:
        block = render(json.loads((DOCS / f"benchmarks-{name}.json").read_text()))
        write_owned_block(DOCS / "benchmarks.md", name, block)
        print(block)
        return
    plan.rounds = plan.rounds or (1 if plan.quick else rounds)
    plan.window = plan.window or (2.0 if plan.quick else window_s)
    plan.warmup = 0.5 if plan.quick else 1.0
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        plan.work = Path(tmp)
        result = run(plan)
    block = render(result)
    out = plan.out or (None if plan.quick else DOCS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"benchmarks-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        write_owned_block(out / "benchmarks.md", name, block)
    print(block)


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
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
        info["isa"] = ", ".join(n for f, n in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
                                              ("avx_vnni", "AVX-VNNI"), ("amx_tile", "AMX")) if f in flags) or "no AVX2"
    except (OSError, AttributeError):
        pass
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
    import onnxruntime

    info["ort_providers"] = onnxruntime.get_available_providers()
    env = {k: v for k, v in os.environ.items() if k.startswith("EFFNET_")}
    if env:
        info["effnet_env"] = env
    return info


def command(plan) -> str:
    return " ".join(["python -m benchmarks.run", *plan.argv]).strip()


def models_summary(manifests: dict, results: dict) -> dict:
    """Per model: p50/p95 at 1 client and the best throughput on 1920x1080 photos (raw ORT's default session at batch 1
    where the service did not run the model). Read by the accuracy report (`effnet report --bench`)."""
    out = {}
    service = results.get("service") or []
    for name, rw in (results.get("raw") or {}).items():
        entry: dict[str, Any] = {"macs": manifests.get(name, {}).get("macs"), "resolution": rw.get("resolution")}
        photos = [r for r in service if r["model"] == name and r["input"] == "photo" and r.get("body") == "raw" and r.get("img_per_s")]
        one = row(service, name, "photo", 1)
        best = max(photos, key=lambda r: r["img_per_s"]) if photos else None
        b1 = (rw.get("default") or rw)["batches"].get("1")
        if one and best:
            entry.update(p50_ms=one["p50_ms"], p95_ms=one["p95_ms"], img_per_s=best["img_per_s"],
                         source=f"service, 1920x1080 JPEG; latency at 1 client, throughput at {best['concurrency']} clients")
        elif b1:
            entry.update(p50_ms=b1["batch_ms_p50"], p95_ms=None, img_per_s=b1["img_per_s"], source="raw ONNX Runtime, default session, batch 1")
        entry["raw_b1_img_per_s"] = b1["img_per_s"] if b1 else None
        entry["best_batch"] = rw.get("best_batch")
        out[name] = entry
    return out


def write(plan, meta: dict, manifests: dict, results: dict) -> list[Path]:
    out = plan.out
    md_path, json_path, png_path = out / "benchmarks.md", out / "benchmarks.json", out / "benchmarks.png"
    tgt = targets(plan, results)
    data = {"meta": meta, "command": command(plan), "quick": plan.quick, "plan": {
        "models": plan.models, "full_matrix": plan.full, "memory_models": plan.memory, "phases": plan.phases,
        "concurrency": plan.concurrency, "peers": plan.peers, "window_s": plan.load_s, "warmup_s": plan.warmup_s,
        "raw_seconds_per_batch": plan.raw_s, "naive_threads": plan.naive_threads, "repository": str(plan.repo),
        "pytriton": plan.pytriton_note},
        "models": models_summary(manifests, results), "targets": tgt, "bought": bought(plan, results), **results,
        "manifests": {k: {"macs": v.get("macs"), "params": v.get("params"), "resolution": v["preprocess"]["crop"],
                          "padding": v.get("padding")} for k, v in manifests.items()}}
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


def _header(plan, meta: dict) -> list[str]:
    v = meta.get("versions", {})
    L = ["# Benchmarks\n",
         "<!-- Written by `python -m benchmarks.run` (make bench). Edits outside the manual markers are overwritten. -->\n"]
    if plan.quick:
        L.append("> **Quick (smoke) run**: tiny custom models and ~1 s windows. It checks that the benchmark works; its numbers mean nothing.\n")
    others = meta.get("others_cpu_pct")
    if others is not None and others > CONTENDED_PCT and not plan.quick:
        L.append(f"> **Contended run**: other processes used about {others:.0f}% of one core (of {meta.get('cores')}) while it ran. "
                 "Every comparison is between measurements of this one run, mostly alternating or side by side, so ratios hold "
                 "better than absolute numbers; still, read differences under ~10% as noise.\n")
    L.append(f"- **Command**: `{command(plan)}`")
    L.append(f"- **Date**: {meta.get('started')} → {meta.get('finished')} (measured run {meta.get('run_s', 0):.0f} s; building missing "
             f"models beforehand {meta.get('build_s', 0):.0f} s" + (f", PyTriton venv {meta['pytriton_setup_s']:.0f} s" if "pytriton_setup_s" in meta else "") + ")")
    L.append(f"- **Machine**: {meta.get('cpu')}, {meta.get('cores')} cores, {meta.get('memory_gib')} GiB RAM; {meta.get('platform')}"
             + (f"; ISA: {meta['isa']}" if meta.get("isa") else ""))
    la0, la1 = meta.get("loadavg_start"), meta.get("loadavg_end")
    if la0 and la1:
        L.append(f"- **Load**: 1-minute load average {la0[0]:.2f} at the start, {la1[0]:.2f} at the end; other processes' CPU during the "
                 f"run {others if others is not None else 0:.0f}% of one core (the machine's busy time less this run's)")
    L.append(f"- **Versions**: Python {meta.get('python')}, " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    if meta.get("git"):
        L.append(f"- **Code**: git {meta['git']}")
    if meta.get("effnet_env"):
        L.append("- **EFFNET_* environment**: " + ", ".join(f"`{k}={val}`" for k, val in sorted(meta["effnet_env"].items())))
    L.append(f"- **Models**: {', '.join(plan.models)} (random weights: the speed of real ones); matrix: {', '.join(plan.full)}; "
             f"loaded in the service: {', '.join(plan.memory)}; repository `{plan.repo}`")
    L.append(f"- **Method**: everything in one run on one machine, so ratios hold where absolute times drift. Load windows "
             f"{plan.load_s:g} s after {plan.warmup_s:g} s of warm-up; raw ORT {plan.raw_s:g} s per batch size. The load generator "
             f"(`benchmarks/loadgen.py`) runs in its own process: N closed-loop clients on keep-alive connections (raw asyncio "
             f"streams), each sending its next request when the previous answer is in.\n")
    return L


def markdown(plan, meta: dict, manifests: dict, results: dict, tgt: list[dict], plotted: bool, png: str, manual: str) -> str:
    L = _header(plan, meta)
    L.append("## Targets (issue 14)\n")
    L.append(T.table(["target", "status", "numbers"], [[t["target"], f"**{t['status']}**", t["detail"]] for t in tgt]))
    L.append("")
    sections = [("1. Raw ONNX Runtime: the ceiling (default session) and the server's session", T.raw_section(plan, manifests, results)),
                ("2. What each ORT session setting costs", T.arena_section(results)),
                ("3. SAME vs symmetric padding (Lite0)", T.padding_section(results)),
                ("4. The service", T.service_section(plan, results)),
                ("5. Peers", T.peers_section(plan, results)),
                ("6. perf_analyzer beside the load generator", T.perf_section(plan, results)),
                ("7. Preprocessing alone", T.prep_section(results)),
                ("8. Memory", T.memory_section(plan, results)),
                ("9. Throughput and p95 latency vs MACs", f"![throughput and p95 latency vs MACs]({png})\n" if plotted else T.NOT_RUN)]
    for title, body in sections:
        L += [f"## {title}\n", body]
    L.append("## What each change bought (this run)\n")
    rows = bought(plan, results)
    if rows:
        L.append("Only what this run measured side by side (alternating raw runs, or windows of the same run); older history "
                 "is in the notes at the end.\n")
        L.append(T.table(["change", "compared", "numbers"], rows))
        L.append("")
    else:
        L.append(T.NOT_RUN)
    L.append("## GPU: unmeasured\n")
    L.append(f"`make bench` measures the CPU only (ONNX Runtime providers here: {', '.join(meta.get('ort_providers', []))}). "
             "The GPU figures (CUDA EP with IOBinding, TensorRT EP, b0 and b4 at batch 1/8/32/128, raw and through the service) "
             "need a GPU machine and are not part of this run.\n")
    L.append(manual)
    L.append("")
    return "\n".join(L)
