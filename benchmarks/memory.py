"""`make bench-memory`: b0..b7 loaded with default settings, the memory of every process of the service summed.

    python -m benchmarks.memory                    # -> docs/benchmarks-memory.json + <!-- memory --> block
    python -m benchmarks.memory --render           # the block again from docs/benchmarks-memory.json

For the default worker count and for one process: `effnet serve` on a repository of b0..b7 and nothing else
(no batch table: the defaults), measured at ready, then through a burst of 32 concurrent photo requests on
each model in turn (b0 first), sampled every 0.2 s, and 5 s after the burst. Memory is PSS from
/proc/PID/smaps_rollup, summed over the service's process group (shared pages counted once), with RSS beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import ALL_B, DEFAULT_REPO, DOCS, Process, build_models, free_port, group_pids, log, python_env
from benchmarks.blocks import machine_info, write_owned_block
from benchmarks.blocks import cores

GIB = 1 << 30
GOAL = 2.5 * GIB
BURST = 32


def rollup(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}


def snapshot(proc: Process) -> dict:
    """PSS and RSS per process of the service's group: the root, the engine (the biggest child), the rest."""
    rows = {pid: rollup(pid) for pid in group_pids(proc.pid)}
    rows = {pid: r for pid, r in rows.items() if r}
    children = sorted((pid for pid in rows if pid != proc.pid), key=lambda p: -rows[p].get("Rss", 0))
    kinds = {proc.pid: "supervisor" if children else "the one process"}
    if children:
        kinds[children[0]] = "engine"
        kinds.update({pid: "workers and helpers" for pid in children[1:]})
    by: dict[str, dict[str, int]] = {}
    for pid, r in rows.items():
        k = by.setdefault(kinds[pid], {"pss": 0, "rss": 0})
        k["pss"] += r.get("Pss", 0)
        k["rss"] += r.get("Rss", 0)
    return {"pss": sum(k["pss"] for k in by.values()), "rss": sum(k["rss"] for k in by.values()), "by": by}


def burst(url: str, photo: bytes, model: str) -> dict[str, int]:
    import httpx

    def one(_: int) -> int:
        try:
            return httpx.post(f"{url}/classify?model={model}", content=photo, headers={"content-type": "image/jpeg"},
                              timeout=120).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(BURST) as pool:
        codes = list(pool.map(one, range(BURST)))
    return {str(c): codes.count(c) for c in sorted(set(codes))}


def measure(work: Path, repo: Path, workers: int, photo: bytes) -> dict:
    port = free_port()
    env = {k: v for k, v in python_env().items() if not k.startswith("EFFNET_")}
    env.update(EFFNET_REPOSITORY=str(repo), EFFNET_MODELS=",".join(ALL_B), EFFNET_WORKERS=str(workers),
               EFFNET_GRPC_PORT="0")
    proc = Process(f"service, {workers} workers", [sys.executable, "-m", "effnet_serve", "serve", "--host", "127.0.0.1",
                                                   "--port", str(port)], env, port, work / f"memory-{workers}.log")
    try:
        proc.wait_ready(900)
        time.sleep(2.0)
        ready = snapshot(proc)
        peak, stop = dict(ready), threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.2):
                s = snapshot(proc)
                if s["pss"] > peak["pss"]:
                    peak = s

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        answers = {}
        for model in ALL_B:
            answers[model] = burst(proc.base, photo, model)
            log(f"{workers} workers: {model} {answers[model]}, PSS now {snapshot(proc)['pss'] / GIB:.2f} GiB")
        stop.set()
        sampler.join()
        time.sleep(5.0)
        after = snapshot(proc)
    finally:
        proc.stop()
    return {"workers": workers, "ready": ready, "peak": peak, "after": after, "answers": answers}


def run(plan: argparse.Namespace) -> dict:
    from PIL import Image
    from skimage import data as skdata

    build_models(DEFAULT_REPO, ALL_B, True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        repo = work / "repo"  # b0..b7 alone, as a user's repository with no batch table would be
        repo.mkdir()
        for m in ALL_B:
            (repo / m).symlink_to(DEFAULT_REPO / m)
        path = work / "photo.jpg"
        Image.fromarray(skdata.astronaut()).resize((1000, 750)).save(path, quality=90)
        photo = path.read_bytes()
        runs = [measure(work, repo, w, photo) for w in dict.fromkeys([cores(), 1])]
    return {"runs": runs, "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info(),
            "command": "python -m benchmarks.memory"}


def _gib(b: int) -> str:
    return f"{b / GIB:.2f}"


def render(result: dict) -> str:
    m = result["machine"]
    lines = ["<!-- memory -->", "## Memory with b0..b7 loaded (default settings)", "",
             f"`make bench-memory` (`{result['command']}`), {result['seconds']:.0f} s, on {m.get('cpu')} "
             f"({m.get('cores')} cores). A repository of b0..b7 only (random weights, no batch table), every "
             f"setting at its default; a burst of {BURST} concurrent requests with a 1000×750 JPEG on each model in "
             "turn. PSS summed over every process of the service (shared pages counted once), GiB; RSS in brackets.",
             "", "| workers | process | at ready | peak during the bursts | 5 s after |", "| ---: | --- | ---: | ---: | ---: |"]
    verdicts = []
    for r in result["runs"]:
        for kind in r["ready"]["by"]:
            cells = [r[s]["by"].get(kind, {"pss": 0, "rss": 0}) for s in ("ready", "peak", "after")]
            lines.append(f"| {r['workers']} | {kind} | " + " | ".join(f"{_gib(c['pss'])} ({_gib(c['rss'])})" for c in cells) + " |")
        lines.append(f"| {r['workers']} | **all** | " + " | ".join(
            f"**{_gib(r[s]['pss'])}** ({_gib(r[s]['rss'])})" for s in ("ready", "peak", "after")) + " |")
        ok = r["ready"]["pss"] <= GOAL and r["after"]["pss"] <= GOAL
        failed = {m: a for m, a in r["answers"].items() if set(a) != {"200"}}
        verdicts.append(f"- {r['workers']} worker{'s' if r['workers'] > 1 else ''}: {_gib(r['ready']['pss'])} GiB at ready, "
                        f"{_gib(r['after']['pss'])} after the bursts (goal ≤ 2.5): **{'met' if ok else 'missed'}**; "
                        + (f"answers not 200: {failed}" if failed else "every request answered 200"))
    lines += ["", *verdicts, "",
              "The peak is the bursts' own: b7 at batch 8 (600 px) holds its activations and ONNX Runtime's memory "
              "pattern block while it runs; the last batch of a burst gives them back (EFFNET_ORT_SHRINK_MB, "
              "app/engine/sessions.py). EFFNET_MAX_BATCH_B7=1 lowers the peak at some cost in b7's throughput.",
              "<!-- /memory -->"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--render", action="store_true", help="rewrite the block from docs/benchmarks-memory.json only")
    plan = p.parse_args()
    result = json.loads((DOCS / "benchmarks-memory.json").read_text()) if plan.render else run(plan)
    block = render(result)
    if not plan.render:
        (DOCS / "benchmarks-memory.json").write_text(json.dumps(result, indent=2) + "\n")
    write_owned_block(DOCS / "benchmarks.md", "memory", block)
    print(block)


if __name__ == "__main__":
    main()
