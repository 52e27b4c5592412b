"""What every benchmark that owns a block of docs/benchmarks.md shares: writing its block in place (the rest of the
file kept), its command line, and the machine it ran on."""

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

from benchmarks.harness import DOCS

GIB = 1024 * 1024  # KiB per GiB
MANUAL_RE = re.compile(r"<!-- manual -->.*?<!-- /manual -->", re.S)
# Blocks other benchmark scripts own (benchmarks.precision, benchmarks.soak, benchmarks.reliability): kept as they are.
OWNED_NAMES = ("precision", "soak", "reliability", "scaling", "quiet", "memory")
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


def kept_blocks(previous: str) -> str:
    """The blocks other scripts own and the manual notes of a previous benchmarks.md, in their order: what a rewrite keeps."""
    kept = sorted((b.start(), b.group(0)) for block_re in OWNED_BLOCKS if (b := block_re.search(previous)))
    m = MANUAL_RE.search(previous)
    return "\n\n".join([b for _, b in kept] + [m.group(0) if m else "<!-- manual -->\n<!-- /manual -->"])
