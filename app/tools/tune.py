"""`effnet tune`: each model's best batch size on this machine, written into the repository.

    effnet tune                          # every model in EFFNET_REPOSITORY (default models/)
    effnet tune --models b0,b4 --repo models --batches 1,2,4,8,16 --seconds 3
    effnet tune --dry-run                # measure and print, write nothing

The service reads `<repository>/batch_sizes.json` when it loads a model (app/core/config.py `max_batch_for`:
EFFNET_MAX_BATCH_<NAME> > this table > EFFNET_MAX_BATCH > the device's default), so a restart or a reload picks
the new sizes up. Each model runs in the session the server would give it (Settings(): device, threads, arena,
spinning) on random input, each batch size for `--seconds`, the sizes taking turns so the machine's drift
spreads over all of them. The best is the smallest size within 3% of the top throughput: a bigger batch that is
barely faster only adds latency. On 2 CPU cores that is 8 for b0 and 1 or 2 for b4 and up; on a GPU, far more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..core.config import BATCH_SIZES_FILE, Settings, write_batch_table
from ..engine.manifest import ManifestError, load_manifest, verify_onnx
from ..engine.sessions import create_session, resolve_device, spin_for

TOLERANCE = 0.03  # within this fraction of the best throughput, the smaller batch wins
DEFAULT_BATCHES = {"cpu": [1, 2, 4, 8], "cuda": [1, 2, 4, 8, 16, 32, 64, 128]}
ROUNDS = 3


def best_batch(rates: dict[int, float]) -> int:
    """The smallest batch within TOLERANCE of the highest img/s."""
    top = max(rates.values())
    return min(b for b, r in rates.items() if r >= (1.0 - TOLERANCE) * top)


def measure(folder: Path, batches: list[int], seconds: float, settings: Settings, device: str) -> dict[int, float]:
    """img/s of the server's session for this model at each batch size."""
    manifest = load_manifest(folder)
    path = verify_onnx(folder, manifest)
    session = create_session(path, manifest.onnx.input.name, manifest.onnx.output.name, device=device,
                             threads=settings.threads, spinning=spin_for(settings.ort_spinning, manifest.macs),
                             arena=settings.ort_arena)
    crop = manifest.preprocess.crop
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, crop, crop), dtype=np.float32) for b in batches}
    for b in batches:  # the first runs of a shape allocate and plan
        session.run(inputs[b])
        session.run(inputs[b])
    images = dict.fromkeys(batches, 0)
    spent = dict.fromkeys(batches, 0.0)
    for _ in range(ROUNDS):
        for b in batches:
            end = time.perf_counter() + seconds / ROUNDS
            while True:
                t = time.perf_counter()
                session.run(inputs[b])
                spent[b] += time.perf_counter() - t
                images[b] += b
                if time.perf_counter() >= end:
                    break
    return {b: images[b] / spent[b] for b in batches}


def _models(repo: Path, names: list[str]) -> list[str]:
    if names:
        return names
    return sorted(p.name for p in repo.iterdir() if (p / "manifest.json").is_file())


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    p = argparse.ArgumentParser(prog="effnet tune", description="Measure each model's best batch size here and "
                                f"write it into <repo>/{BATCH_SIZES_FILE}, which the service reads.")
    p.add_argument("--repo", type=Path, default=settings.repository, help="model repository (EFFNET_REPOSITORY)")
    p.add_argument("--models", default="", help="comma-separated names (default: every model in the repository)")
    p.add_argument("--batches", default="", help="sizes to try (default: 1,2,4,8 on a CPU, up to 128 on a GPU)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model and batch size")
    p.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    args = p.parse_args(argv)

    device = resolve_device(settings.device)
    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()}) or DEFAULT_BATCHES[device]
    except ValueError:
        p.error("--batches takes comma-separated integers")
    if min(batches) < 1:
        p.error("batch sizes start at 1")
    if not args.repo.is_dir():
        p.error(f"no model repository at {args.repo}")
    names = _models(args.repo, [n.strip() for n in args.models.split(",") if n.strip()])
    best: dict[str, int] = {}
    for name in names:
        try:
            rates = measure(args.repo / name, batches, args.seconds, settings, device)
        except (ManifestError, OSError) as exc:
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            continue
        best[name] = best_batch(rates)
        shown = ", ".join(f"{b}: {r:.1f}" for b, r in rates.items())
        print(f"{name}: img/s by batch {{{shown}}} -> {best[name]}", file=sys.stderr)
    if not best:
        print("no model measured", file=sys.stderr)
        return 1
    if args.dry_run:
        print(json.dumps({device: best}, indent=2, sort_keys=True))
        return 0
    table = write_batch_table(args.repo, device, best)
    print(json.dumps(table, indent=2, sort_keys=True))
    print(f"written to {args.repo / BATCH_SIZES_FILE}; the service reads it when it (re)loads a model",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
