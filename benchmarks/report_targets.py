"""Issue 14's targets, each met / missed with its number, and "what each change bought", from one run's results."""

from __future__ import annotations

import json
from pathlib import Path

GIB = 1024 * 1024  # KiB per GiB
VS_CEILING = {"b0": 0.90, "b4": 0.95}  # (1) service / raw ORT default session at batch 8; (4) is for the same models
VS_LITSERVE = {"model-res": 1.2, "photo": 2.0}  # (2)
RSS_LIMIT_GIB = 2.5  # (3)
P50_SLACK_MS = 2.0  # (4)
ORT_STAGES = ("inference threads", "ORT workers")


def row(rows: list[dict] | None, model: str, kind: str, n: int, body: str = "raw") -> dict | None:
    return next((r for r in rows or [] if r["model"] == model and r["input"] == kind and r["concurrency"] == n
                 and r.get("body", "raw") == body), None)


def peer(results: dict, name: str) -> dict | None:
    return next((p for p in results.get("peers") or [] if p["peer"] == name), None)


def peer_row(p: dict | None, kind: str) -> dict | None:
    return next((r for r in (p or {}).get("rows", []) if r["input"] == kind), None)


def ceiling(results: dict, model: str, r: dict | None) -> tuple[float | None, str]:
    """Default session at batch 8: measured right after the window if it was, else in the raw phase."""
    if r and r.get("raw_b8_adjacent"):
        return r["raw_b8_adjacent"]["img_per_s"], "measured right after the window"
    b8 = (((results.get("raw") or {}).get(model) or {}).get("default") or {}).get("batches", {}).get("8")
    return (b8["img_per_s"], "raw phase") if b8 else (None, "")


def stage_split(r: dict) -> dict[str, float] | None:
    """Per-image CPU ms per stage, the decode pool split into decode and preprocess by their wall times."""
    st = r.get("stage_cpu_ms_per_img")
    if not st:
        return None
    t = r.get("server_timing_ms") or {}
    d, p = t.get("decode", 0.0), t.get("preprocess", 0.0)
    share = d / (d + p) if d + p > 0 else 0.5
    out = {"HTTP + answer (event loop)": st["event loop"], "decode": st["decode pool"] * share,
           "preprocess": st["decode pool"] * (1 - share), "other threads": st["other"]}
    out["ORT"] = sum(st[k] for k in ORT_STAGES)
    return out


def target_models(plan) -> dict[str, float]:
    """The models targets (1) and (4) are about, with (1)'s limit: b0 and b4 (unmeasured when a partial run
    leaves them out); in --quick the tiny stand-ins, in their order."""
    return dict(zip(plan.full, VS_CEILING.values())) if plan.quick else VS_CEILING


def targets(plan, results: dict) -> list[dict]:
    service = results.get("service")
    top_n = max(plan.concurrency)
    head = plan.full[0]
    out: list[dict] = []

    def add(target: str, status: str, detail: str) -> None:
        out.append({"target": target, "status": status, "detail": detail})

    # (1) the default-session ceiling at batch 8.
    for m, limit in target_models(plan).items():
        name = f"(1) {m}: service at {top_n} clients on model-resolution JPEGs ≥ {limit:.2f} of raw ORT's default session at batch 8"
        r = row(service, m, "model-res", top_n)
        ref, where = ceiling(results, m, r)
        if not r or not r.get("img_per_s") or not ref:
            add(name, "unmeasured", "not in this run")
            continue
        ratio = r["img_per_s"] / ref
        extra = ""
        mp = row(service, m, "model-res", top_n, "multipart")
        if mp and mp.get("img_per_s"):
            extra = f"; multipart body {mp['img_per_s']:.1f} img/s = {mp['img_per_s'] / ref:.2f}"
        add(name, "met" if ratio >= limit else "missed",
            f"{r['img_per_s']:.1f} vs {ref:.1f} img/s ({where}) = **{ratio:.2f}** (raw image/jpeg bodies{extra})")
    # (2) LitServe.
    ls = peer(results, "litserve")
    for kind, limit in VS_LITSERVE.items():
        label = "model-resolution JPEGs" if kind == "model-res" else "1080p photos"
        name = f"(2) {head}: ≥ {limit:g}× the LitServe peer on {label}, {top_n} clients"
        s, p = row(service, head, kind, top_n, "multipart"), peer_row(ls, kind)
        if not s or not p or not p.get("img_per_s") or not s.get("img_per_s"):
            add(name, "unmeasured", (ls or {}).get("error") or "not in this run")
            continue
        ratio = s["img_per_s"] / p["img_per_s"]
        add(name, "met" if ratio >= limit else "missed",
            f"{s['img_per_s']:.1f} vs {p['img_per_s']:.1f} img/s = **{ratio:.2f}×** (the same multipart body)")
    # (3) memory.
    mem = results.get("memory")
    name = f"(3) all of b0..b7 loaded, after a burst of photos on each: ≤ {RSS_LIMIT_GIB:g} GiB RSS"
    if mem and mem.get("after_burst"):
        peak = max(mem[k]["VmRSS"] for k in ("idle", "after_burst", "after_load") if k in mem) / GIB
        missing = [m for m in (f"b{i}" for i in range(8)) if m not in mem["models"]]
        if missing and not plan.quick:
            add(name, "unmeasured", f"{', '.join(missing)} not loaded; {peak:.2f} GiB with {', '.join(mem['models'])}")
        else:
            add(name, "met" if peak <= RSS_LIMIT_GIB else "missed",
                f"**{peak:.2f} GiB** with {', '.join(mem['models'])} (highest of idle, after the burst, after all the load; "
                f"peak VmHWM {mem['after_load']['VmHWM'] / GIB:.2f})")
    else:
        add(name, "unmeasured", "service phase not run")
    # (4) p50 at 1 client.
    for m in target_models(plan):
        name = f"(4) {m}: p50 at 1 client ≤ raw batch-1 latency (default session) + {P50_SLACK_MS:g} ms, model-resolution JPEGs"
        r = row(service, m, "model-res", 1)
        if not r or r.get("p50_ms") is None or not r.get("raw_b1_adjacent"):
            add(name, "unmeasured", "not in this run")
            continue
        raw_ms = r["raw_b1_adjacent"]["batch_ms_p50"]
        add(name, "met" if r["p50_ms"] <= raw_ms + P50_SLACK_MS else "missed",
            f"**{r['p50_ms']:.1f} ms** vs {raw_ms:.1f} + {P50_SLACK_MS:g} = {raw_ms + P50_SLACK_MS:.1f} ms "
            f"(raw measured right before the window); over raw by {r['p50_ms'] - raw_ms:.1f} ms")
    # (5) CPU outside ORT, per stage.
    parts = []
    for kind in ("model-res", "photo"):
        r = row(service, head, kind, top_n)
        sp = stage_split(r) if r else None
        if sp and r.get("server_cpu_ms_per_img"):
            outside = {k: v for k, v in sp.items() if k != "ORT"}
            big = max(outside, key=outside.get)
            parts.append(f"{kind}: {r['server_cpu_ms_per_img']:.1f} ms/img in all, ORT {sp['ORT']:.1f}, outside ORT "
                         f"**{sum(outside.values()):.1f}** (" + ", ".join(f"{k} {v:.1f}" for k, v in outside.items())
                         + f"); largest: **{big}**")
    add(f"(5) CPU time per image outside ORT, per stage ({head}, {top_n} clients)", "reported" if parts else "unmeasured",
        "; ".join(parts) + (" — section 4" if parts else "not in this run"))
    # (6) int8: its own block, written by make bench-precision.
    add("(6) int8 where the hardware has it (Lite0, `make bench-precision`)", *int8_status(plan.out))
    return out


def int8_status(out: Path) -> tuple[str, str]:
    path = out / "benchmarks-precision.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unmeasured", "no precision run recorded here (`make bench-precision` writes its own section)"
    rows = [(m, r["int8"]) for m, r in (data.get("models") or {}).items() if isinstance(r, dict) and "int8" in r]
    if not rows:
        return "unmeasured", f"{path.name} has no int8 row"
    m, r = rows[0]
    gate = r.get("gate") or {}
    fp32 = (data["models"][m].get("fp32") or {}).get("img_per_s", {}).get("1")
    speed = f", {r['img_per_s']['1'] / fp32:.2f}× fp32 at batch 1" if fp32 and r.get("img_per_s", {}).get("1") else ""
    agree = f"agreement with fp32 {gate['agreement']:.1%}" if gate.get("agreement") is not None else "agreement unknown"
    return ("met" if r.get("ships") else "missed",
            f"{m}-int8 {'ships' if r.get('ships') else 'refused by the 99% gate'}: {agree}{speed} "
            f"(run of {data.get('date', '?')}; see the [precision section](#fp16-and-int8-copies-effnet-build---precision))")


def bought(plan, results: dict) -> list[list[str]]:
    """[change, what was compared in this run, numbers]: only what this run's phases measured side by side."""
    rows: list[list[str]] = []
    arena = {r["key"]: r for r in (results.get("arena") or {}).get("rows", [])}
    if arena:
        a = results["arena"]
        at = f"{a['model']} batch {a['batch']}, raw, alternating"
        d = arena["default"]["img_per_s"]

        def cmp(x: str, y: str) -> str:
            return (f"{arena[x]['img_per_s']:.1f} → {arena[y]['img_per_s']:.1f} img/s ({arena[y]['img_per_s'] / arena[x]['img_per_s'] - 1:+.0%}); "
                    f"{arena[y]['img_per_s'] / d:.2f} of the default session")
        rows.append(["one shared ORT arena with memory patterns instead of none (`EFFNET_ORT_ARENA=shared`, app/engine/sessions.py)",
                     f"`off` → `shared`, {at}", cmp("off", "shared")])
        rows.append(["spinning off (`EFFNET_ORT_SPINNING=false`)", f"`shared+spin` → `shared`, {at}", cmp("shared+spin", "shared")])
        rows.append(["one arena for all sessions rather than one each", f"`per-session` → `shared`, {at}", cmp("per-session", "shared")])
    raw = results.get("raw") or {}
    for m in plan.full:
        r = raw.get(m)
        if r and r.get("default"):
            cells = [f"batch {b}: {r['batches'][b]['img_per_s'] / r['default']['batches'][b]['img_per_s']:.2f}"
                     for b in ("1", "8") if b in r["batches"] and b in r["default"]["batches"]]
            if cells:
                rows.append(["the server's session settings as configured for this run (inter-op 1, sequential, "
                             f"arena {r.get('arena')}, spinning {'on' if r.get('spinning') else 'off'})",
                             f"{m}: server's session ÷ default session, raw, alternating", ", ".join(cells)])
    prep = ((results.get("prep") or {}).get("models") or {}).get(plan.full[0])
    if prep:
        rows.append(["draft JPEG decode (DCT scaling) before the resize (app/engine/preprocess.py)",
                     f"{plan.full[0]}, one 1920×1080 photo, one thread",
                     f"{prep['plain_ms']:.1f} → {prep['ours_ms']:.1f} ms ({prep['speedup']:.1f}×)"])
    top_n = max(plan.concurrency)
    head = plan.full[0]
    fa = peer(results, "fastapi")
    for kind in ("model-res", "photo"):
        s, f = row(results.get("service"), head, kind, top_n, "multipart"), peer_row(fa, kind)
        if s and f and f.get("img_per_s") and s.get("img_per_s"):
            rows.append(["the service's whole data plane (dynamic batching, decode pool, draft decode, tuned session) over "
                         "the server most users write first", f"{head} {kind}, {top_n} clients, multipart: FastAPI + ORT peer → service",
                         f"{f['img_per_s']:.1f} → {s['img_per_s']:.1f} img/s ({s['img_per_s'] / f['img_per_s']:.2f}×)"])
    for kind in ("model-res", "photo"):
        s, mp = row(results.get("service"), head, kind, top_n), row(results.get("service"), head, kind, top_n, "multipart")
        if s and mp and s.get("img_per_s") and mp.get("img_per_s"):
            rows.append(["sending the image as the raw body instead of multipart (what parsing multipart costs)",
                         f"{head} {kind}, {top_n} clients", f"{mp['img_per_s']:.1f} → {s['img_per_s']:.1f} img/s "
                         f"({s['img_per_s'] / mp['img_per_s'] - 1:+.0%}); server CPU {mp.get('server_cpu_ms_per_img') or 0:.1f} → "
                         f"{s.get('server_cpu_ms_per_img') or 0:.1f} ms/img"])
    return rows
