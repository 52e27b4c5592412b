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
from benchmarks.records import BatchTable, Model, OrtTiming, Record
from effnet_serve.engine.manifest import load_manifest
from effnet_serve.engine.sessions import spin_for, spin_mode
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


def timing(phase: str, model: str, session: str, m: dict, note: str = "") -> OrtTiming:
    """A raw_ort summary as a record."""
    return OrtTiming(phase=phase, model=model, session=session, batch=m["batch"], img_per_s=m["img_per_s"],
                     ms_p50=m["batch_ms_p50"], cpu_ms_per_img=m["cpu_ms_per_img"], runs=m["runs"], note=note)


def phase_raw(plan, models: dict[str, Model]) -> list[Record]:
    """Both sessions of every model; sets each Model's best batch and writes the batch tables."""
    out: list[Record] = []
    best: dict[str, int] = {}
    device = "cpu"
    for name in plan.models:
        batches = plan.raw_batches(name)
        default_batches = CEILING_BATCHES if name in plan.full else [1]
        log(f"raw ORT {name}: server's session at {batches}, default session at {default_batches}")
        r = measure_model(plan.repo / name, batches, plan.raw_s, default_batches=default_batches)
        device = r["device"]
        b = best_batch(r)
        # Written only where the measurement brackets the optimum: the full sweep, or a short
        # sweep whose throughput already falls at its largest size.
        models[name].best_batch, models[name].best_batch_written = b, name in plan.full or b < max(batches)
        if models[name].best_batch_written:
            best[name] = b
        out += [timing("raw", name, "server", m) for m in r["batches"].values()]
        out += [timing("raw", name, "default", m) for m in r["default"]["batches"].values()]
        log("  server's: " + ", ".join(f"b{k} {v['img_per_s']:.1f}" for k, v in r["batches"].items())
            + f" img/s (best {b}); default: " + ", ".join(f"b{k} {v['img_per_s']:.1f}" for k, v in r["default"]["batches"].items()))
        gc.collect()
    out.append(write_batch_sizes(plan.repo, device, best))
    # `make serve` reads models/: the sizes measured here hold for any weights of the same variant.
    served = ROOT / "models"
    if not plan.quick and served.is_dir() and served.resolve() != plan.repo.resolve():
        out.append(write_batch_sizes(served, device, best))
    return out


def write_batch_sizes(repo: Path, device: str, best: dict[str, int]) -> BatchTable:
    from effnet_serve.core.config import BATCH_SIZES_FILE, write_batch_table

    write_batch_table(repo, device, best)
    return BatchTable(path=str(repo / BATCH_SIZES_FILE), device=device, written=best)


def phase_arena(plan) -> list[Record]:
    from effnet_serve.core.config import Settings

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
        mine = arena == s.ort_arena and spin_mode(spinning) == spin_for(s.ort_spinning, load_manifest(path.parent).macs)
        rows.append(timing("arena", name, key, m, what + (" (the server's default)" if mine else "")))
        log(f"  {key:12} {m['img_per_s']:6.1f} img/s  {m['cpu_ms_per_img']:.1f} ms CPU/img")
    del runs
    gc.collect()
    return rows


def conv_pads(path: Path) -> tuple[int, int]:
    """Conv nodes of a graph and how many have asymmetric pads (TF SAME on a stride-2 conv)."""
    import onnx

    convs = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Conv"]
    pads = [next((list(a.ints) for a in n.attribute if a.name == "pads"), []) for n in convs]
    return len(convs), sum(bool(p) and p[:len(p) // 2] != p[len(p) // 2:] for p in pads)


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


def phase_padding(plan, models: dict[str, Model]) -> list[Record]:
    """Both Lite0 graphs alternating; fills in their Model records' padding facts."""
    from effnet_serve.core.config import Settings

    same_name, sym_name = plan.padding_models
    folders = {"same": plan.repo / same_name, "symmetric": plan.repo / sym_name}
    if plan.quick:
        folders["same"] = same_padded_copy(plan.repo / sym_name, plan.work / "padding" / f"{sym_name}-same")
    threads = Settings().threads
    runs, crop = {}, None
    for folder in folders.values():
        manifest = json.loads((folder / "manifest.json").read_text())
        onnx_path = folder / manifest["onnx"]["file"]
        crop = manifest["preprocess"]["crop"]
        runs[folder.name] = default_session(onnx_path, manifest["onnx"]["input"]["name"], manifest["onnx"]["output"]["name"], threads)
        m = models.setdefault(folder.name, Model(name=folder.name, px=crop, macs=manifest["macs"], params=manifest.get("params")))
        m.padding, m.pretrained = manifest.get("padding"), (manifest.get("weights") or {}).get("pretrained")
        m.conv, m.asymmetric_conv = conv_pads(onnx_path)
    log(f"padding: {' vs '.join(f'{n} ({models[n].padding})' for n in runs)}, default session, alternating")
    measured = alternate(runs, crop, {k: CEILING_BATCHES for k in runs}, plan.padding_s, rounds=plan.arena_rounds)
    return [timing("padding", n, "default", t) for n in runs for t in measured[n].values()]
