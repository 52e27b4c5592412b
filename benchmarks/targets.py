"""Issue 14's targets as checks over one run's records: each says its goal, met / missed / unmeasured, and the numbers."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.records import LoadWindow, Results

GIB = 1024 * 1024  # KiB per GiB
VS_CEILING = {"b0": 0.90, "b4": 0.95}  # (1) service / raw ORT default session at batch 8; (4) is for the same models
VS_LITSERVE = {"model-res": 1.2, "photo": 2.0}  # (2)
RSS_LIMIT_GIB = 2.5  # (3)
P50_SLACK_MS = 2.0  # (4)
ORT_STAGES = ("inference threads", "ORT workers")


@dataclass
class Check:
    goal: str
    status: str  # met | missed | unmeasured | reported
    numbers: str


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def target_models(res: Results) -> dict[str, float]:
    """b0 and b4 with (1)'s limit; in --quick the tiny stand-ins, in their order."""
    return dict(zip(res.run.full, VS_CEILING.values())) if res.run.quick else VS_CEILING


def ceiling(res: Results, model: str, w: LoadWindow) -> tuple[float | None, str]:
    """Default session at batch 8: measured right after the window if it was, else in the raw phase."""
    if w.raw_batch == 8 and w.raw_img_per_s:
        return w.raw_img_per_s, "measured right after the window"
    b8 = res.ort("raw", model, "default", 8)
    return (b8.img_per_s, "raw phase") if b8 else (None, "")


def vs_ceiling(res: Results) -> list[Check]:
    out = []
    for m, limit in target_models(res).items():
        goal = f"(1) {m}: service at {res.top_n} clients on model-resolution JPEGs ≥ {limit:.2f} of raw ORT's default session at batch 8"
        w = res.service(m, "model-res", res.top_n)
        ref, where = ceiling(res, m, w) if w else (None, "")
        if not w or not w.img_per_s or not ref:
            out.append(Check(goal, "unmeasured", "not in this run"))
            continue
        mp = res.service(m, "model-res", res.top_n, "multipart")
        extra = f"; multipart body {mp.img_per_s:.1f} img/s = {mp.img_per_s / ref:.2f}" if mp and mp.img_per_s else ""
        out.append(Check(goal, verdict(w.img_per_s / ref >= limit),
                         f"{w.img_per_s:.1f} vs {ref:.1f} img/s ({where}) = **{w.img_per_s / ref:.2f}** (raw image/jpeg bodies{extra})"))
    return out


def vs_litserve(res: Results) -> list[Check]:
    out = []
    for kind, limit in VS_LITSERVE.items():
        label = "model-resolution JPEGs" if kind == "model-res" else "1080p photos"
        goal = f"(2) {res.head}: ≥ {limit:g}× the LitServe peer on {label}, {res.top_n} clients"
        s, p = res.service(res.head, kind, res.top_n, "multipart"), res.window("litserve", res.head, kind, res.top_n)
        if not s or not p or not s.img_per_s or not p.img_per_s:
            out.append(Check(goal, "unmeasured", "not in this run"))
            continue
        out.append(Check(goal, verdict(s.img_per_s / p.img_per_s >= limit),
                         f"{s.img_per_s:.1f} vs {p.img_per_s:.1f} img/s = **{s.img_per_s / p.img_per_s:.2f}×** (the same multipart body)"))
    return out


def memory(res: Results) -> list[Check]:
    goal = f"(3) all of b0..b7 loaded, after a burst of photos on each: ≤ {RSS_LIMIT_GIB:g} GiB RSS"
    mem = res.memory
    if not mem:
        return [Check(goal, "unmeasured", "service phase not run")]
    peak = max(mem.idle_kib, mem.after_burst_kib, mem.after_load_kib) / GIB
    missing = [f"b{i}" for i in range(8) if f"b{i}" not in mem.models]
    if missing and not res.run.quick:
        return [Check(goal, "unmeasured", f"{', '.join(missing)} not loaded; {peak:.2f} GiB with {', '.join(mem.models)}")]
    return [Check(goal, verdict(peak <= RSS_LIMIT_GIB),
                  f"**{peak:.2f} GiB** with {', '.join(mem.models)} (highest of idle, after the burst, after all the load; "
                  f"peak VmHWM {mem.hwm_kib / GIB:.2f})")]


def p50_one_client(res: Results) -> list[Check]:
    out = []
    for m in target_models(res):
        goal = f"(4) {m}: p50 at 1 client ≤ raw batch-1 latency (default session) + {P50_SLACK_MS:g} ms, model-resolution JPEGs"
        w = res.service(m, "model-res", 1)
        if not w or w.p50_ms is None or w.raw_batch != 1 or w.raw_ms_p50 is None:
            out.append(Check(goal, "unmeasured", "not in this run"))
            continue
        limit = w.raw_ms_p50 + P50_SLACK_MS
        out.append(Check(goal, verdict(w.p50_ms <= limit),
                         f"**{w.p50_ms:.1f} ms** vs {w.raw_ms_p50:.1f} + {P50_SLACK_MS:g} = {limit:.1f} ms (raw measured right "
                         f"before the window); over raw by {w.p50_ms - w.raw_ms_p50:.1f} ms"))
    return out


def stage_split(w: LoadWindow) -> dict[str, float] | None:
    """CPU ms per image by stage, the decode pool split into decode and preprocess by their wall times."""
    st, t = w.stage_cpu_ms, w.timing_ms
    if not st:
        return None
    d, p = t.get("decode", 0.0), t.get("preprocess", 0.0)
    share = d / (d + p) if d + p > 0 else 0.5
    return {"HTTP + answer (event loop)": st["event loop"], "decode": st["decode pool"] * share,
            "preprocess": st["decode pool"] * (1 - share), "engine loop (batching, link)": st.get("engine loop", 0.0),
            "other threads": st["other"], "ORT": sum(st[k] for k in ORT_STAGES)}


def outside_ort(res: Results) -> list[Check]:
    parts = []
    for kind in ("model-res", "photo"):
        w = res.service(res.head, kind, res.top_n)
        sp = stage_split(w) if w else None
        if w and sp and w.server_cpu_ms_per_img:
            outside = {k: v for k, v in sp.items() if k != "ORT"}
            parts.append(f"{kind}: {w.server_cpu_ms_per_img:.1f} ms/img in all, ORT {sp['ORT']:.1f}, outside ORT "
                         f"**{sum(outside.values()):.1f}** (" + ", ".join(f"{k} {v:.1f}" for k, v in outside.items())
                         + f"); largest: **{max(outside, key=outside.__getitem__)}**")
    return [Check(f"(5) CPU time per image outside ORT, per stage ({res.head}, {res.top_n} clients)",
                  "reported" if parts else "unmeasured", "; ".join(parts) + " — section 2" if parts else "not in this run")]


def int8(precision: dict | None) -> list[Check]:
    """From `make bench-precision`'s JSON (its own block): does an int8 copy ship?"""
    goal = "(6) int8 where the hardware has it (Lite0, `make bench-precision`)"
    rows = [(m, r["int8"]) for m, r in ((precision or {}).get("models") or {}).items() if isinstance(r, dict) and "int8" in r]
    if not rows:
        return [Check(goal, "unmeasured", "no int8 row recorded here (`make bench-precision` writes its own section)")]
    m, r = rows[0]
    agreement = (r.get("gate") or {}).get("agreement")
    fp32 = ((precision or {})["models"][m].get("fp32") or {}).get("img_per_s", {})
    speed = "".join(f", {r['img_per_s'][b] / fp32[b]:.2f}× fp32 at batch {b}" for b in ("1", "8")
                    if fp32.get(b) and (r.get("img_per_s") or {}).get(b))
    agree = f"agreement with fp32 {agreement:.1%}" if agreement is not None else "agreement unknown"
    return [Check(goal, verdict(bool(r.get("ships"))),
                  f"{m}-int8 {'ships' if r.get('ships') else 'refused by the 99% gate'}: {agree}{speed} (run of "
                  f"{(precision or {}).get('date', '?')}; see the [precision section](#fp16-and-int8-copies-effnet-build---precision))")]


def targets(res: Results, precision: dict | None = None) -> list[Check]:
    return vs_ceiling(res) + vs_litserve(res) + memory(res) + p50_one_client(res) + outside_ort(res) + int8(precision)
