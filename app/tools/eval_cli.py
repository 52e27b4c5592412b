"""`effnet eval` and `effnet report`.

    effnet eval --model lite0 --data DIR [--repo models] [--limit N] [--batch B] [--json]
    effnet report --repo models [--bench FILE] --out docs/   # FILE: python -m benchmarks.report --models-json FILE

`eval` is torch-free (it runs in the runtime image); `report` needs matplotlib (the
`report` extra), imported only when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _default_repo() -> str:
    return os.environ.get("EFFNET_REPOSITORY", "models")


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effnet eval",
        description="Top-1/top-5 accuracy of a built model on a labelled image set, through the served "
        "preprocessing and the exported ONNX; records it as accuracy.measured in the model's manifest.",
    )
    p.add_argument("--model", help="model name in the repository (lite0, b0, ...)")
    p.add_argument("--cascade", help="instead of --model: a confidence cascade, cheapest first (lite0,lite2); reports "
                   "accuracy, mean MACs per image and the fraction escalated, and records it in <repo>/cascades.json")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="--cascade: pass an image on when the top-1 probability is under this (default 0.6)")
    p.add_argument("--data", required=True, type=Path,
                   help="ImageFolder tree (folders named by WordNet id, class index or class name), a CSV of "
                   "path,label, a val.txt, LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt, "
                   "or a folder holding one of those")
    p.add_argument("--repo", type=Path, default=Path(_default_repo()), help="model repository (default: $EFFNET_REPOSITORY or models)")
    p.add_argument("--format", default="auto", choices=["auto", "folder", "csv", "valtxt", "loc", "ilsvrc"], help="data layout (default: detect)")
    p.add_argument("--images", type=Path, help="folder of the images when it is not the label file's folder")
    p.add_argument("--synsets", type=Path, help="devkit meta.mat or map_clsloc.txt, for ILSVRC2012_validation_ground_truth.txt")
    p.add_argument("--name", help="dataset name recorded in the manifest (default: from the data)")
    p.add_argument("--limit", type=int, help="evaluate a fixed pseudo-random subset of N images (see --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--batch", type=int, default=8, help="images per ONNX run (default 8)")
    p.add_argument("--device", default=os.environ.get("EFFNET_DEVICE", "auto"), choices=["cpu", "cuda", "auto"],
                   help="as EFFNET_DEVICE (default: $EFFNET_DEVICE or auto, like the server)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: the cores)")
    p.add_argument("--max-pixels", type=int, help="refuse larger images, as EFFNET_MAX_IMAGE_PIXELS (default: the server's)")
    p.add_argument("--confusion", type=int, default=10, help="how many of the most frequent mistakes to list (default 10)")
    p.add_argument("--predictions", type=Path, help="also write every image's top-5 to this CSV")
    p.add_argument("--no-write", action="store_true", help="do not record the result in the manifest")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fmt_ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "n/a"


def print_text(d: dict, out=None) -> None:
    w = (out or sys.stdout).write
    w(f"model {d['model']} on {d['dataset']} ({d['format']}): {d['size']} images scored")
    if d["errors"]:
        w(f", {d['errors']} could not be read")
    if d["missing"]:
        w(f", {d['missing']} listed but missing (skipped)")
    w("\n")
    if d["size"]:
        w(f"  top-1 {d['top1']:.2f}%  ({d['top1_correct']}/{d['size']}, 95% CI {_fmt_ci(d['top1_ci95'])})\n")
        w(f"  top-5 {d['top5']:.2f}%  ({d['top5_correct']}/{d['size']}, 95% CI {_fmt_ci(d['top5_ci95'])})\n")
    rate = f"{d['img_per_s']:.1f} img/s end to end" if d["img_per_s"] else "n/a"
    model_rate = f", {d['model_img_per_s']:.1f} img/s in the model" if d["model_img_per_s"] else ""
    w(f"  speed {rate}{model_rate} (batch {d['batch']}, {d['provider']})\n")
    if d["confusion"]:
        w("  most frequent mistakes (true -> predicted):\n")
        for c in d["confusion"]:
            w(f"    {c['count']:>4} of {c['of_true']:<4} {c['true_label']} ({c['true']}) -> {c['predicted_label']} ({c['predicted']})\n")
    for e in d["error_files"][:10]:
        w(f"  error: {e['path']}: {e['error']}\n")
    if len(d["error_files"]) > 10:
        w(f"  ... and {len(d['error_files']) - 10} more errors\n")


def run_eval(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    if (args.model is None) == (args.cascade is None):
        print("effnet eval: give --model NAME or --cascade A,B", file=sys.stderr)
        return EXIT_USAGE
    if args.cascade is not None:
        return run_cascade_eval(args)
    from .eval import (
        DatasetError,
        EvalError,
        LabelResolver,
        evaluate,
        open_dataset,
        write_measured,
    )
    from ..engine.manifest import ManifestError, load_manifest

    folder = args.repo / args.model
    if not (folder / "manifest.json").is_file():
        print(f"effnet eval: no model {args.model!r} in {args.repo}", file=sys.stderr)
        return EXIT_USAGE
    if args.limit is not None and args.limit < 1:
        print("effnet eval: --limit must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        labels = load_manifest(folder).labels
        ds = open_dataset(args.data, LabelResolver(labels), args.format, images=args.images, synsets=args.synsets, name=args.name)
        result = evaluate(
            folder, ds, batch=args.batch, limit=args.limit, seed=args.seed, device=args.device,
            threads=args.threads, max_pixels=args.max_pixels, progress=not args.quiet,
        )
    except (DatasetError, EvalError, ManifestError) as exc:
        print(f"effnet eval: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, DatasetError) else EXIT_FAIL
    d = result.to_dict(args.confusion)
    if args.predictions:
        result.write_predictions(args.predictions)
    written = None
    if not args.no_write:
        if result.tally.n == 0:
            print("effnet eval: no image could be scored; the manifest is left as it was", file=sys.stderr)
        else:
            try:
                written = str(write_measured(folder, result.measured(), result.onnx_sha256))
            except EvalError as exc:
                print(f"effnet eval: {exc}", file=sys.stderr)
                return EXIT_FAIL
    d["manifest_written"] = written
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print_text(d)
        if written:
            print(f"  recorded as accuracy.measured in {written}")
    return EXIT_OK if result.tally.n else EXIT_FAIL


def run_cascade_eval(args: argparse.Namespace) -> int:
    from .eval import DatasetError, EvalError, LabelResolver, open_dataset
    from .eval.cascade import evaluate_cascade, write_cascade
    from ..engine.manifest import ManifestError, load_manifest

    names = [n.strip() for n in args.cascade.split(",") if n.strip()]
    for name in names:
        if not (args.repo / name / "manifest.json").is_file():
            print(f"effnet eval: no model {name!r} in {args.repo}", file=sys.stderr)
            return EXIT_USAGE
    try:
        labels = load_manifest(args.repo / names[0]).labels
        ds = open_dataset(args.data, LabelResolver(labels), args.format, images=args.images, synsets=args.synsets, name=args.name)
        d = evaluate_cascade(
            args.repo, names, ds, args.threshold, batch=args.batch, limit=args.limit, seed=args.seed, device=args.device,
            threads=args.threads, max_pixels=args.max_pixels, progress=not args.quiet,
        )
    except (DatasetError, EvalError, ManifestError) as exc:
        print(f"effnet eval: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, DatasetError) else EXIT_FAIL
    d["written"] = str(write_cascade(args.repo, d)) if not args.no_write and d["size"] else None
    if args.json:
        print(json.dumps(d, indent=2))
        return EXIT_OK if d["size"] else EXIT_FAIL
    w = sys.stdout.write
    w(f"cascade {d['name']} at threshold {d['threshold']:g} on {d['dataset']}: {d['size']} images scored\n")
    if d["size"]:
        w(f"  top-1 {d['top1']:.2f}% {_fmt_ci(d['top1_ci95'])}  top-5 {d['top5']:.2f}% {_fmt_ci(d['top5_ci95'])}\n")
        w(f"  mean MACs per image {d['mean_macs'] / 1e9:.3f}G; escalated {100 * d['escalated_fraction']:.1f}%\n")
        for name, m in d["models"].items():
            w(f"  alone: {name:<12} top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  MACs {m['macs'] / 1e9:.3f}G\n")
        w("  threshold sweep (threshold: top-1 %, mean GMACs, escalated %):\n")
        for s in d["sweep"]:
            w(f"    {s['threshold']:.2f}: {s['top1']:.2f}  {s['mean_macs'] / 1e9:.3f}  {100 * s['escalated_fraction']:.1f}\n")
    if d["written"]:
        w(f"  recorded in {d['written']}\n")
    return EXIT_OK if d["size"] else EXIT_FAIL


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effnet report",
        description="Plot accuracy against MACs (and against latency, given a benchmark JSON) for every "
        "model in the repository, and write accuracy.md with the plots and a table.",
    )
    p.add_argument("--repo", type=Path, default=Path(_default_repo()), help="model repository (default: $EFFNET_REPOSITORY or models)")
    p.add_argument("--bench", type=Path, help='benchmark JSON: {"models": {"b0": {"p50_ms": .., "p95_ms": .., "img_per_s": ..}}}')
    p.add_argument("--out", type=Path, default=Path("docs"), help="output folder for accuracy.md and the PNGs (default docs)")
    p.add_argument("--notes", type=Path, help="markdown inserted after the title (e.g. what the evaluation set is)")
    p.add_argument("--command", help="the command line to print as 'regenerate with' (default: this one)")
    return p


def run_report(argv: list[str]) -> int:
    args = report_parser().parse_args(argv)
    try:
        from .report import ReportError, write_report
    except ImportError as exc:
        print(f"effnet report: needs matplotlib (pip install 'effnet-serve[report]'): {exc}", file=sys.stderr)
        return EXIT_FAIL
    command = args.command or "effnet report " + " ".join(argv)
    try:
        md = write_report(args.repo, args.out, bench=args.bench, notes=args.notes, command=command)
    except ReportError as exc:
        print(f"effnet report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {md}")
    return EXIT_OK


def main(argv: list[str]) -> int:
    """argv[0] is the subcommand: `eval` or `report`."""
    if not argv or argv[0] not in ("eval", "report"):
        print("usage: effnet {eval,report} ...", file=sys.stderr)
        return EXIT_USAGE
    return run_eval(argv[1:]) if argv[0] == "eval" else run_report(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
