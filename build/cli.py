"""`effnet build` and `effnet variants`."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path

from .recipes import LITE_PACKAGES, TORCHVISION_V1
from .scaling import (
    DEFAULT_MODEL_SET,
    KNOWN_VARIANTS,
    PAPER_PARAMS_MACS,
    Variant,
    count_params_macs,
    custom_variant,
    named_variant,
    phi_variant,
)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def _quiet_exporter_logs() -> None:
    # The exporter warns about torchvision ops it cannot find; we use none of them.
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _variants_from_args(args: argparse.Namespace) -> list[Variant]:
    custom = args.phi is not None or args.width is not None or args.depth is not None or args.resolution is not None
    if custom:
        if args.phi is not None:
            variant = phi_variant(args.phi, name=args.name)
        else:
            if None in (args.width, args.depth, args.resolution):
                raise ValueError("--width, --depth and --resolution go together (or use --phi)")
            variant = custom_variant(args.name or f"w{args.width:g}-d{args.depth:g}-r{args.resolution}",
                                     args.width, args.depth, args.resolution, lite=args.lite)
        return [variant]
    presets = {"all": KNOWN_VARIANTS, "default": DEFAULT_MODEL_SET}
    names = presets.get(args.models) or [n.strip().lower() for n in args.models.split(",") if n.strip()]
    if args.name and len(names) != 1:
        raise ValueError("--name renames a single model; give one --models entry")
    variants = [named_variant(n) for n in names]
    return [replace(variants[0], name=args.name)] if args.name else variants


def cmd_build(args: argparse.Namespace) -> int:
    from .repository import BuildAnnouncement

    _quiet_exporter_logs()
    variants = _variants_from_args(args)
    for v in variants:
        if not NAME_PATTERN.match(v.name):
            raise ValueError(f"model name {v.name!r} must match {NAME_PATTERN.pattern}")
    repo = Path(args.repo)
    precisions = _precisions(args)
    refused = 0
    # A server polling this repository lists what is still to come (`make serve` serves while it builds).
    with BuildAnnouncement(repo, [v.name for v in variants]) as announced:
        for v in variants:
            refused += _build_one(args, repo, v, precisions)
            announced.done(v.name)
    return 1 if refused else 0


def _build_one(args: argparse.Namespace, repo: Path, v: Variant, precisions: list[str]) -> int:
    """One variant, then its derived precisions; returns how many of those derivations were refused."""
    from tqdm import tqdm

    from .pipeline import PHASES, build_model

    bar = tqdm(total=len(PHASES), desc=f"{v.name:>8}", unit="phase", leave=True, file=sys.stderr,
               bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} {postfix}", disable=args.quiet)

    def on_phase(phase: str) -> None:
        bar.set_postfix_str(phase)
        bar.n = PHASES.index(phase)
        bar.refresh()

    result = build_model(v, repo, weights_spec=args.weights, force=args.force,
                         cache_dir=Path(args.cache_dir) if args.cache_dir else None, seed=args.seed,
                         on_phase=on_phase, warn=lambda msg: tqdm.write(msg, file=sys.stderr))
    bar.n = len(PHASES)
    bar.set_postfix_str("up to date, skipped" if result.skipped else "done")
    bar.close()
    if result.manifest:
        m = result.manifest
        print(f"{m['name']}: {m['params'] / 1e6:.2f}M params, {m['macs'] / 1e9:.3f}G MACs at {m['preprocess']['crop']}px, "
              f"pretrained={m['weights']['pretrained']}, parity {m['onnx']['parity']['max_abs_diff']:.1e} -> {result.path}")
    else:
        print(f"{v.name}: up to date -> {result.path}")
    return sum(not _derive_one(args, repo, v.name, p) for p in precisions)


def _precisions(args: argparse.Namespace) -> list[str]:
    wanted = [p.strip().lower() for p in args.precision.split(",") if p.strip()]
    if all(p == "fp32" for p in wanted):
        return []  # the plain build: no import of the derivation code, which needs app/ beside build/
    try:
        from .precision import PRECISIONS
    except ImportError as exc:
        raise ValueError(f"--precision needs the whole effnet package (the served preprocessing and eval): {exc}") from exc
    unknown = [p for p in wanted if p not in ("fp32", *PRECISIONS)]
    if unknown:
        raise ValueError(f"--precision takes fp32, {', '.join(PRECISIONS)}; not {', '.join(unknown)}")
    derived = [p for p in dict.fromkeys(wanted) if p != "fp32"]
    if derived and args.check_data is None:
        raise ValueError("--precision fp16/int8 needs --check-data: labelled photos (any `effnet eval` layout) "
                         "on which top-1 must not drop")
    return derived


def _derive_one(args: argparse.Namespace, repo: Path, base: str, precision: str) -> bool:
    """Make base-<precision>; False (and a reason on stderr) when its gates refused it."""
    from .precision import PrecisionError, derive, derived_name, remove_stale

    name = derived_name(base, precision)
    if not args.quiet:
        print(f"{name}: converting from {base}, then checking against it ...", file=sys.stderr)
    try:
        result = derive(
            repo, base, precision, Path(args.check_data),
            agreement_data=Path(args.agreement_data) if args.agreement_data else None,
            calibration_data=Path(args.calibration_data) if args.calibration_data else None,
            min_agreement=args.min_agreement, force=args.force, seed=args.seed,
        )
    except PrecisionError as exc:
        removed = remove_stale(repo, name, base)
        print(f"effnet build: {exc}" + (f" (removed the older {name}, made from another {base})" if removed else ""),
              file=sys.stderr)
        return False
    if result.skipped:
        print(f"{name}: up to date -> {result.path}")
        return True
    g = result.manifest["onnx"]["parity"]
    size = result.manifest["onnx"]["size_bytes"] / 1e6
    print(f"{name}: {size:.1f} MB, top-1 agrees with {base} on {g['agreement']:.1%} of {g['inputs']} inputs "
          f"({g['images']} photos x {g['views']} views), top-1 {g['top1_derived']}/{g['labelled']} "
          f"(fp32 {g['top1_fp32']}) -> {result.path}")
    return True


def variants_table() -> list[dict]:
    rows = []
    for name in KNOWN_VARIANTS:
        v = named_variant(name)
        params, macs = count_params_macs(v)
        recipe = TORCHVISION_V1.get(name) or LITE_PACKAGES.get(name)
        paper = PAPER_PARAMS_MACS.get(name)
        rows.append({
            "name": name,
            "family": v.family,
            "phi": v.phi,
            "width": v.width_mult,
            "depth": v.depth_mult,
            "resolution": v.resolution,
            "dropout": v.dropout,
            "params": params,
            "macs": macs,
            "paper_params": paper[0] if paper else None,
            "paper_macs": paper[1] if paper else None,
            "reference_top1": recipe.top1 if recipe else None,
        })
    return rows


def cmd_variants(args: argparse.Namespace) -> int:
    rows = variants_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<7}{'phi':>5}{'width':>7}{'depth':>7}{'res':>6}{'params':>10}{'MACs':>10}{'top-1':>8}")
    for r in rows:
        phi = "" if r["phi"] is None else f"{r['phi']:g}"
        top1 = "" if r["reference_top1"] is None else f"{r['reference_top1']:.1f}"
        print(f"{r['name']:<7}{phi:>5}{r['width']:>7.2f}{r['depth']:>7.2f}{r['resolution']:>6}"
              f"{r['params'] / 1e6:>9.2f}M{r['macs'] / 1e9:>9.2f}G{top1:>8}")
    print("MACs = multiply-adds per image at the paper's resolution (the paper's 'FLOPs').")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effnet", description="Build EfficientNet variants into an ONNX model repository.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build models into the repository")
    b.add_argument("--models", default="default",
                   help=f"comma list of {', '.join(KNOWN_VARIANTS)}; 'default' = {','.join(DEFAULT_MODEL_SET)}; 'all'")
    b.add_argument("--phi", type=float, help="build the compound-scaled variant for this phi")
    b.add_argument("--width", type=float, help="explicit width multiplier (with --depth and --resolution)")
    b.add_argument("--depth", type=float, help="explicit depth multiplier")
    b.add_argument("--resolution", type=int, help="explicit input resolution")
    b.add_argument("--lite", action="store_true", help="explicit coefficients on the Lite architecture")
    b.add_argument("--name", help="model name in the repository (custom variants, or one --models entry)")
    b.add_argument("--weights", default="auto",
                   help="auto | pretrained | random | efficientnet_pytorch | efficientnet_pytorch-advprop | PATH | URL "
                   "(default auto). A PATH/URL may be a torchvision, efficientnet_pytorch or efficientnet-lite-pytorch "
                   "checkpoint; its layout decides padding and BatchNorm settings")
    b.add_argument("--repo", default="models", help="model repository folder (default models/)")
    b.add_argument("--cache-dir", help="checkpoint download cache (default ~/.cache/effnet/checkpoints or $EFFNET_CACHE)")
    b.add_argument("--seed", type=int, default=0, help="seed for random weights")
    b.add_argument("--force", action="store_true", help="rebuild even when the manifest matches the inputs")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--precision", default="fp32",
                   help="comma list of fp32, fp16, int8: also write <name>-fp16 / <name>-int8, each only if it "
                   "passes its gates (top-1 on --check-data unchanged, >= --min-agreement with fp32)")
    b.add_argument("--check-data", help="labelled photos for the precision gates (any layout `effnet eval` reads)")
    b.add_argument("--agreement-data", help="photos on which top-1 agreement with fp32 is measured (default: "
                   "--check-data); small sets are stretched to ~256 inputs with seeded crops and flips")
    b.add_argument("--calibration-data", help="int8: photos like the ones it will serve, for activation ranges "
                   "(keep them apart from the check photos)")
    b.add_argument("--min-agreement", type=float, default=0.99, help="precision gate (default 0.99)")
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("variants", help="print the family table (params and MACs) without building")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_variants)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("effnet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback helps no one at a shell
        print(f"effnet {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
