"""The phases that time ONNX Runtime alone, in this process (no HTTP):

  raw      the ceiling (default session) and the server's session per model; the server's session's
           best batch size goes to <repo>/batch_sizes.json
  arena    b0 at batch 8, one alternating run: the default session against the server's session with
           each arena/spinning setting (what each setting costs here)
  padding  Lite0 with TF "SAME" padding (its pretrained weights: asymmetric Conv pads) against Lite0
           with random weights (symmetric pads), default session, batch 1 and 8, alternating
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

from benchmarks.harness import ROOT, log
from app.engine.sessions import spin_mode
from benchmarks.raw_ort import alternate, best_batch, default_session, measure_model, model_file, server_session

CEILING_BATCHES = [1, 8]
BATCH_SWEEP = [1, 2, 4, 8]
# (key, what it is, arena, spinning); arena None = the default session, not ours.
ARENA_SETTINGS = [
    ("default", "ORT's default session (an arena per session, memory patterns, spinning on)", None, None),
    ("shared+spin", "the server's session: one shared arena, spinning on", "shared", True),
    ("shared", "the server's session: one shared arena, spinning off", "shared", False),
    ("per-session", "the server's session: an arena per session, spinning off", "per-session", False),
    ("off", "the server's session: arena and memory patterns off, spinning off (before the arena change)", "off", False),
]


def phase_raw(plan, results: dict) -> None:
    raw: dict = {}
    best: dict = {}
    for name in plan.models:
        batches = plan.raw_batches(name)
        default_batches = CEILING_BATCHES if name in plan.full else [1]
        log(f"raw ORT {name}: server's session at {batches}, default session at {default_batches}")
        raw[name] = r = measure_model(plan.repo / name, batches, plan.raw_s, default_batches=default_batches)
        b = best_batch(r)
        r["best_batch"] = b
        # Written only where the measurement brackets the optimum: the full sweep, or a short
        # sweep whose throughput already falls at its largest size.
        r["best_batch_written"] = name in plan.full or b < max(batches)
        if r["best_batch_written"]:
            best[name] = b
        log("  server's: " + ", ".join(f"b{k} {v['img_per_s']:.1f}" for k, v in r["batches"].items())
            + f" img/s (best {b}); default: " + ", ".join(f"b{k} {v['img_per_s']:.1f}" for k, v in r["default"]["batches"].items()))
        gc.collect()
    results["raw"] = raw
    results["batch_sizes"] = write_batch_sizes(plan.repo, raw, best)
    # `make serve` reads models/: the sizes measured here hold for any weights of the same variant.
    served = ROOT / "models"
    if not plan.quick and served.is_dir() and served.resolve() != plan.repo.resolve():
        results["batch_sizes_served"] = write_batch_sizes(served, raw, best)


def write_batch_sizes(repo: Path, raw: dict, best: dict[str, int]) -> dict:
    from app.core.config import BATCH_SIZES_FILE, write_batch_table

    device = next((r["device"] for r in raw.values()), "cpu")
    table = write_batch_table(repo, device, best)
    return {"path": str(repo / BATCH_SIZES_FILE), "device": device, "written": best, "table": table}


def phase_arena(plan, results: dict) -> None:
    from app.core.config import Settings

    name, batch = plan.full[0], plan.arena_batch
    path, iname, oname, crop = model_file(plan.repo / name)
    s = Settings()
    runs = {}
    for key, _, arena, spinning in ARENA_SETTINGS:
        runs[key] = (default_session(path, iname, oname, s.threads) if arena is None
                     else server_session(path, iname, oname, arena=arena, spinning=spinning).run)
    log(f"ORT settings, {name} batch {batch}: {', '.join(runs)} alternating, {plan.arena_rounds} rounds")
    measured = alternate(runs, crop, {k: [batch] for k in runs}, plan.arena_s, rounds=plan.arena_rounds)
    rows = []
    for key, what, arena, spinning in ARENA_SETTINGS:
        m = measured[key][str(batch)]
        rows.append({"key": key, "what": what, "arena": arena, "spinning": spinning,
                     "is_server_default": arena == s.ort_arena and spin_mode(spinning) == s.ort_spinning, **m})
        log(f"  {key:12} {m['img_per_s']:6.1f} img/s  {m['cpu_ms_per_img']:.1f} ms CPU/img")
    results["arena"] = {"model": name, "batch": batch, "threads": s.threads, "rounds": plan.arena_rounds,
                        "seconds_per_setting": plan.arena_s, "rows": rows}
    del runs
    gc.collect()


def conv_pads(path: Path) -> dict:
    """Conv nodes of a graph and how many have asymmetric pads (TF SAME on a stride-2 conv)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    convs = asym = pads_ops = 0
    for node in model.graph.node:
        if node.op_type == "Pad":
            pads_ops += 1
        if node.op_type != "Conv":
            continue
        convs += 1
        pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), [])
        half = len(pads) // 2
        asym += bool(pads) and pads[:half] != pads[half:]
    return {"conv": convs, "asymmetric_conv": asym, "pad_ops": pads_ops}


def same_padded_copy(src: Path, dst: Path) -> Path:
    """--quick only (the Lite0 builds take minutes): a copy of a tiny model whose stride-2 Conv pads are
    rewritten as TF SAME pads them on an even input (k // 2 - 1 before, k // 2 after); same shapes."""
    import onnx

    shutil.copytree(src, dst, dirs_exist_ok=True)
    model = onnx.load(str(dst / "model.onnx"))
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and "pads" in attrs and list(attrs["strides"].ints) == [2, 2]:
            p = list(attrs["pads"].ints)
            if p[0] >= 1 and p[:2] == p[2:]:
                attrs["pads"].ints[:] = [p[0] - 1, p[1] - 1, p[2], p[3]]
    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["padding"] = "same (rewritten for --quick)"
    manifest["onnx"].pop("sha256", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def phase_padding(plan, results: dict) -> None:
    from app.core.config import Settings

    same_name, sym_name = plan.padding_models
    folders = {"same": plan.repo / same_name, "symmetric": plan.repo / sym_name}
    if plan.quick:
        folders["same"] = same_padded_copy(plan.repo / sym_name, plan.work / "padding" / f"{sym_name}-same")
    threads = Settings().threads
    runs, info, crop = {}, {}, None
    for key, folder in folders.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        onnx_path = folder / manifest["onnx"]["file"]
        crop = manifest["preprocess"]["crop"]
        runs[key] = default_session(onnx_path, manifest["onnx"]["input"]["name"], manifest["onnx"]["output"]["name"], threads)
        info[key] = {"model": folder.name, "padding": manifest.get("padding"),
                     "pretrained": (manifest.get("weights") or {}).get("pretrained"), **conv_pads(onnx_path)}
    log(f"padding: {info['same']['model']} ({info['same']['padding']}) vs {info['symmetric']['model']} "
        f"({info['symmetric']['padding']}), default session, alternating")
    measured = alternate(runs, crop, {k: CEILING_BATCHES for k in runs}, plan.padding_s, rounds=plan.arena_rounds)
    for b in CEILING_BATCHES:
        a, s = measured["same"][str(b)], measured["symmetric"][str(b)]
        log(f"  batch {b}: same {a['img_per_s']:.1f}, symmetric {s['img_per_s']:.1f} img/s = {a['img_per_s'] / s['img_per_s']:.2f}x")
    results["padding"] = {"models": info, "batches": measured, "threads": threads, "rounds": plan.arena_rounds}
