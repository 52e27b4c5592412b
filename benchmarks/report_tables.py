"""The numbered sections of docs/benchmarks.md, one function each; each returns Markdown ("Not run." when its
phase was left out)."""

from __future__ import annotations

import json
import re

from benchmarks.report_targets import GIB, peer_row, row, stage_split

NOT_RUN = "Not run.\n"
_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(?:[×%]| / [\d,.]+)?(?: \(.*\))?$|^–$")


def f(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; columns whose every cell is a number are right-aligned."""
    numeric = [bool(rows) and all(_NUMERIC.match(r[i].strip("*")) for r in rows) for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _ips_ms(x: dict | None) -> str:
    return "–" if not x else f"{x['img_per_s']:.1f} / {x['batch_ms_p50']:.1f}"


def raw_section(plan, manifests: dict, results: dict) -> str:
    raw = results.get("raw")
    if not raw:
        return NOT_RUN
    first = next(iter(raw.values()))
    L = [f"*Default session* (the ceiling): `onnxruntime.InferenceSession(path, providers=[\"CPUExecutionProvider\"])` with "
         f"`intra_op_num_threads={first['threads']}` (the service's thread count) and nothing else set: ORT's arena per session, "
         f"memory patterns and spinning at their defaults. *Server's session*: `app.engine.sessions.create_session` as the "
         f"server creates it ({first['provider']}, {first['threads']} intra-op threads, inter-op 1, sequential, arena "
         f"`{first.get('arena')}`, spinning {'on' if first['spinning'] else 'off'}). Random input, `session.run` in a loop, "
         f"the two sessions of a model alternating (2 turns each) at the sizes both run. Cells: img/s / median ms per run.\n"]
    sizes = sorted({int(b) for r in raw.values() for b in r["batches"]})
    rows = []
    for n, r in raw.items():
        d = (r.get("default") or {}).get("batches", {})
        cells = [n, str(r["resolution"]), f(manifests[n]["macs"] / 1e9, 2), _ips_ms(d.get("1")), _ips_ms(d.get("8"))]
        cells += [_ips_ms(r["batches"].get(str(b))) for b in sizes]
        cells += [f"{r['batches'][b]['img_per_s'] / d[b]['img_per_s']:.2f}" if b in d and b in r["batches"] else "–" for b in ("1", "8")]
        cells.append(" / ".join(f(d[b]["cpu_ms_per_img"]) for b in ("1", "8") if b in d))
        cells.append(f"{r['best_batch']}" + ("" if r["best_batch_written"] else " (not written)"))
        rows.append(cells)
    L.append(table(["model", "px", "GMACs", "default b1", "default b8"] + [f"server's b{b}" for b in sizes]
                   + ["server's ÷ default b1", "server's ÷ default b8", "ORT CPU ms/img, default b1 / b8", "best batch (server's)"], rows))
    bs = results.get("batch_sizes") or {}
    L.append(f"\nBest batch = the smallest size of the server's session within 3% of its highest throughput. Written to "
             f"`{bs.get('path')}` under `\"{bs.get('device')}\"` (merged with what was there), which the server reads at start-up: "
             f"{json.dumps(bs.get('written', {}))}. A model measured only at batch 1 and 2 gets an entry only when batch 2 is "
             f"already slower. *ORT CPU ms/img*: this process's CPU time over the timed runs per image (both ORT threads).\n")
    return "\n".join(L)


def arena_section(results: dict) -> str:
    a = results.get("arena")
    if not a:
        return NOT_RUN
    d = next(r for r in a["rows"] if r["key"] == "default")
    rows = [[f"`{r['key']}`" + (" (the server's default)" if r["is_server_default"] else ""), r["what"], f(r["img_per_s"]),
             f(r["batch_ms_p50"]), f(r["cpu_ms_per_img"]), f"{r['img_per_s'] / d['img_per_s']:.2f}"] for r in a["rows"]]
    return (f"{a['model']} at batch {a['batch']}, {a['threads']} intra-op threads, every setting in one process, "
            f"{a['rounds']} rounds of turns ({a['seconds_per_setting']:g} s per setting in all): what each session setting "
            f"costs on this machine. `EFFNET_ORT_ARENA=shared|per-session|off`, `EFFNET_ORT_SPINNING`.\n\n"
            + table(["setting", "what", "img/s", "ms per run", "CPU ms/img", "÷ default"], rows) + "\n")


def padding_section(results: dict) -> str:
    p = results.get("padding")
    if not p:
        return NOT_RUN
    rows = []
    for key in ("same", "symmetric"):
        i, m = p["models"][key], p["batches"][key]
        rows.append([i["model"], str(i["padding"] or "–"), str(i["pretrained"]).lower(), str(i["conv"]), str(i["asymmetric_conv"]),
                     _ips_ms(m.get("1")), _ips_ms(m.get("8"))])
    ratios = {b: p["batches"]["same"][b]["img_per_s"] / p["batches"]["symmetric"][b]["img_per_s"] for b in p["batches"]["same"]}
    rows.append(["SAME ÷ symmetric", "", "", "", "", *(f"{ratios[b]:.2f}" for b in ("1", "8"))])
    worst = min(ratios.values())
    verdict = ("a SAME-padded Lite0 is as fast as the symmetric one (within 5% at both sizes)" if all(abs(r - 1) <= 0.05 for r in ratios.values())
               else f"the SAME-padded graph runs at {worst:.2f}× the symmetric one at its worst size")
    return ("The same architecture exported twice: with its TF weights (padding `same`: the stride-2 Conv nodes carry asymmetric "
            "pads) and with random weights (padding `symmetric`). Default session, "
            f"{p['threads']} intra-op threads, alternating ({p['rounds']} rounds). Cells: img/s / median ms per run.\n\n"
            + table(["model", "padding", "pretrained", "Conv nodes", "asymmetric pads", "batch 1", "batch 8"], rows)
            + f"\n\nIn this run {verdict}.\n")


def _stages(t: dict) -> str:
    return "/".join(f(x) for x in ((t.get("decode", 0) + t.get("preprocess", 0)) if t else None, t.get("queue"), t.get("inference")))


def service_section(plan, results: dict) -> str:
    service = results.get("service")
    if not service:
        return NOT_RUN
    mem = results.get("memory") or {}
    L = [f"`effnet serve` (subprocess, 127.0.0.1, started through `benchmarks/service_probe.py`, which only adds one idle thread "
         f"that names the server's threads) with {', '.join(mem.get('models', []))} loaded, default `EFFNET_*` settings and the "
         f"batch table above; max batch per model as the server reported it: {json.dumps(mem.get('max_batch', {}))}. "
         f"Inputs: a JPEG at the model's resolution (model-res) and a 1920×1080 photo, quality 90 "
         f"({next((r['body_bytes'] for r in service if r['input'] == 'photo' and r['body'] == 'raw'), 0) // 1024} KiB), "
         f"sent as the raw body (`Content-Type: image/jpeg`) or as the peers' multipart body (field `file`).\n"]
    rows = []
    for r in service:
        ceil = r.get("raw_b8_adjacent") or r.get("raw_b1_adjacent")
        cells = [r["model"], r["input"], r["body"], str(r["concurrency"]), f(r["img_per_s"]), f(r["p50_ms"]), f(r["p95_ms"]),
                 f(r["p99_ms"]), str(r["errors"]) + (f" (+{r['unfinished']} unfinished)" if r.get("unfinished") else ""),
                 f(r.get("mean_batch"), 2), _stages(r.get("server_timing_ms") or {}), f(r.get("server_cpu_pct"), 0),
                 f(r.get("server_cpu_ms_per_img")),
                 (f"b{ceil['batch']}: {ceil['img_per_s']:.1f} / {ceil['batch_ms_p50']:.1f}" if ceil else "–")]
        rows.append(cells)
    L.append(table(["model", "input", "body", "N", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch", "stages ms",
                    "server CPU %", "CPU ms/img", "default session next to it (img/s / ms)"], rows))
    L.append("\n*mean batch*: images per inference run (`effnet_batch_size` histogram, window and warm-up); *server CPU*: the "
             "server's process group over the window, % of one core and per image; *stages*: mean `results[0].timing_ms` of "
             "every 10th answer (decode+preprocess / queue / inference); *default session next to it*: raw ORT's default session "
             "measured right before the 1-client window (batch 1) and right after the top-N model-res window (batch 8).\n")
    L.append("### CPU time per image by stage (target 5)\n")
    L.append("Each server thread's CPU time over the window (`/proc/PID/task/TID/stat`), per answered image (ms). *HTTP + answer*: "
             "the event-loop thread (HTTP parsing, multipart, routing, admission, JSON answer); *decode* and *preprocess*: the decode "
             "pool, split by the two stages' wall times from `timing_ms`; *ORT*: each model's inference thread (it runs one share "
             "of ORT's intra-op work, plus softmax/top-k) and ORT's pool threads; *other*: the remaining Python threads and "
             "libuv's. *ORT, raw*: the default session's CPU per image at batch 1 / 8 in the raw phase.\n")
    rows = []
    raw = results.get("raw") or {}
    for r in service:
        sp = stage_split(r)
        if not sp:
            continue
        outside = {k: v for k, v in sp.items() if k != "ORT"}
        d = ((raw.get(r["model"]) or {}).get("default") or {}).get("batches", {})
        rows.append([r["model"], r["input"], r["body"], str(r["concurrency"]), f(r.get("server_cpu_ms_per_img")),
                     *(f(outside[k]) for k in outside), f(sum(outside.values())), f(sp["ORT"]),
                     " / ".join(f(d[b]["cpu_ms_per_img"]) for b in ("1", "8") if b in d) or "–",
                     max(outside, key=outside.get)])
    if rows:
        L.append(table(["model", "input", "body", "N", "server CPU ms/img", "HTTP + answer", "decode", "preprocess", "other",
                        "outside ORT", "ORT", "ORT, raw b1 / b8", "largest outside ORT"], rows))
        L.append("")
    over = []
    for r in service:
        t, raw1 = r.get("server_timing_ms") or {}, (r.get("raw_b1_adjacent") or {}).get("batch_ms_p50")
        if r["concurrency"] != 1 or raw1 is None or not t.get("total") or r.get("p50_ms") is None:
            continue
        stages = sum(t.get(k, 0.0) for k in ("decode", "preprocess", "queue", "inference"))
        over.append([r["model"], r["input"], f(r["p50_ms"]), f(raw1), f(r["p50_ms"] - raw1), f(t.get("decode")), f(t.get("preprocess")),
                     f(t.get("queue")), f(t.get("inference", 0.0) - raw1), f(t["total"] - stages), f(r["p50_ms"] - t["total"])])
    if over:
        L.append("### Where the time over raw ORT goes at 1 client (target 4)\n")
        L.append("ms; raw = the default session at batch 1 measured right before the window; the rest from the server's own "
                 "`timing_ms` (mean of sampled answers). *in handler, other*: thread hops, softmax/top-k, building the answer; "
                 "*outside handler*: HTTP, the load generator, the network stack.\n")
        L.append(table(["model", "input", "p50", "raw batch 1", "over raw", "decode", "preprocess", "queue", "inference − raw",
                        "in handler, other", "outside handler"], over))
        L.append("")
    return "\n".join(L)


def peers_section(plan, results: dict) -> str:
    peers = results.get("peers")
    if not peers:
        return NOT_RUN
    top_n, head = max(plan.concurrency), plan.full[0]
    service = results.get("service")
    L = [f"{head} at {top_n} clients, the same JPEG bytes, the same load generator, each server alone on the machine "
         f"(the service's rows come from section 4: its server had every memory model loaded). *server CPU*: the whole "
         f"process group (LitServe and PyTriton work in child processes); *RSS*: the group's, after the load. "
         f"*service ÷*: the service's multipart img/s over the row's.\n"]
    rows = []
    base = {k: row(service, head, k, top_n, "multipart") for k in ("model-res", "photo")}
    entries = [("service, multipart", {"rows": [r for r in (base["model-res"], base["photo"]) if r],
                                      "rss_kib": (results.get("memory") or {}).get("after_load", {}).get("VmRSS")}),
               ("service, raw image/jpeg", {"rows": [r for r in (row(service, head, "model-res", top_n), row(service, head, "photo", top_n)) if r],
                                           "rss_kib": None})]
    entries += [(p["peer"], p) for p in peers]
    if results.get("naive"):
        entries.append(("naive (PyTorch eager)", results["naive"]))
    for label, p in entries:
        if p.get("skipped") or p.get("error"):
            rows.append([label, "–", *["–"] * 7, f"not run: {p.get('skipped') or p.get('error')}".replace("|", "\\|")])
            continue
        for kind in ("model-res", "photo"):
            r = peer_row(p, kind)
            if not r:
                continue
            b = base.get(kind)
            ratio = (f"{b['img_per_s'] / r['img_per_s']:.2f}×" if b and b.get("img_per_s") and r.get("img_per_s") and label != "service, multipart"
                     else "–")
            rows.append([label, kind, f(r["img_per_s"]), f(r["p50_ms"]), f(r["p99_ms"]), str(r["errors"]),
                         f(r.get("server_cpu_pct"), 0), f(r.get("server_cpu_ms_per_img")),
                         f(p["rss_kib"] / GIB, 2) if p.get("rss_kib") else "–", ratio])
    L.append(table(["server", "input", "img/s", "p50 ms", "p99 ms", "errors", "server CPU %", "CPU ms/img", "RSS GiB", "service ÷"], rows))
    L.append("")
    for p in peers + ([results["naive"]] if results.get("naive") else []):
        L.append(f"- **{p['peer']}**: {p['what']}" + (f"; ready after {p['ready_s']:.0f} s" if p.get("ready_s") else ""))
    L.append("\nThe peers are in `benchmarks/peers/` (README there); none is part of the product.\n")
    return "\n".join(L)


def perf_section(plan, results: dict) -> str:
    pa = results.get("perf_analyzer")
    if not pa:
        return NOT_RUN
    L = [f"Triton's `perf_analyzer` (tritonclient 2.41.1, `make perf-analyzer`) against the same `effnet serve`: "
         f"model {pa['model']}, batch {pa['batch']}" + (f" (the model's max batch; {pa['requested_batch']} asked)" if pa["batch"] != pa["requested_batch"] else "")
         + f", random FP32 tensors as binary data, {plan.perf_interval_ms / 1000:g} s windows until three agree within 25% "
         f"(at most {plan.perf_trials}; once more within 60% when they do not: column *stable*). **It measures something else than the load generator**: preprocessed tensors to "
         f"`/v2/models/{pa['model']}/infer` (no JPEG decode, no resize; {pa['request_mb']:.1f} MB per request), while "
         f"the load generator uploads JPEGs to `/classify`.\n"]
    rows = []
    for r in pa["runs"]:
        if r.get("img_per_s"):
            rows.append([f"perf_analyzer, {r['protocol']}", f"FP32 tensors, batch {r['batch']}", str(r["concurrency"]) + " requests",
                         f(r["img_per_s"]), f(r.get("p50_ms")), f(r.get("p99_ms")),
                         f"within {r['stability_pct']}%" if r.get("stable") else "no"])
        else:
            rows.append([f"perf_analyzer, {r['protocol']}", "–", "–", "–", "–", "–", r["status"]])
    for body in ("raw", "multipart"):
        r = row(results.get("service"), pa["model"], "model-res", max(plan.concurrency), body)
        if r:
            rows.append([f"load generator, {body} body", "model-res JPEG, 1 image", f"{r['concurrency']} clients", f(r["img_per_s"]),
                         f(r["p50_ms"]), f(r["p99_ms"]), "–"])
    L.append(table(["tool", "sends", "concurrency", "img/s", "p50 ms", "p99 ms", "stable"], rows))
    for r in pa["runs"]:
        if r.get("command"):
            L.append(f"\n`{r['command']}`" + ("" if r.get("rc", 0) == 0 else f" — exit {r['rc']}"))
    L.append("")
    return "\n".join(L)


def prep_section(results: dict) -> str:
    prep = results.get("prep")
    if not prep:
        return NOT_RUN
    rows = [[m, f"{p['resize']}→{p['crop']}", f(p["plain_decode_ms"]), f(p["plain_ms"]), f(p["ours_ms"]), f"{p['speedup']:.1f}×",
             "×".join(map(str, p["ours_decoded_size"])), f(p["ours_nodraft_ms"]), f"{p['mean_abs_diff']:.4f}",
             f"{p['mean_abs_diff_nodraft']:.4f}"] for m, p in prep["models"].items()]
    return (f"One 1920×1080 JPEG (quality 90, {prep['photo_bytes'] // 1024} KiB), median of {next(iter(prep['models'].values()))['reps']} "
            f"runs in one thread. *plain*: `Image.open().convert('RGB')`, resize the whole image, crop, ToTensor + Normalize "
            f"(torchvision's eval transform, what the peers do). *ours*: `app.engine.preprocess.prepare(draft=True)`, the service's "
            f"path. Difference: mean |ours − reference| in normalised units.\n\n"
            + table(["model", "resize→crop", "plain decode ms", "plain total ms", "ours ms", "speed-up", "ours decodes at",
                     "ours, no draft, ms", "diff (draft)", "diff (no draft)"], rows) + "\n")


def memory_section(plan, results: dict) -> str:
    mem = results.get("memory")
    if not mem or not mem.get("after_burst"):
        return NOT_RUN
    rows = [["idle, just ready", f(mem["idle"]["VmRSS"] / GIB, 2)],
            [f"after a burst of photos on each model ({plan.burst_clients} clients, {plan.burst_s:g} s each)", f(mem["after_burst"]["VmRSS"] / GIB, 2)],
            ["after all the load of section 4", f(mem["after_load"]["VmRSS"] / GIB, 2)],
            ["peak (VmHWM)", f(mem["after_load"]["VmHWM"] / GIB, 2)]]
    return (f"VmRSS of the `effnet serve` process with {', '.join(mem['models'])} loaded (ready after {mem['ready_s']:.0f} s, "
            f"each session warmed at its batch sizes), ORT arena `{(next(iter((results.get('raw') or {}).values()), {}) or {}).get('arena', 'shared')}`.\n\n"
            + table(["when", "RSS GiB"], rows) + "\n")
