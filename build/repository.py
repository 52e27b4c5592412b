"""Writing one model into the repository: the manifest, and the atomic swap into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import onnx
import onnxruntime
import torch

from . import __version__
from .export import INPUT_NAME, OPSET, OUTPUT_NAME, Parity
from .scaling import Variant, default_preprocess
from .weights import LoadedWeights

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
LABELS_FILE = Path(__file__).parent / "data" / "imagenet_classes.txt"
# Build code that cannot change an fp32 model: editing it must not force every model to rebuild.
FP32_IRRELEVANT = {"cli.py", "precision.py"}


def imagenet_labels() -> list[str]:
    labels = LABELS_FILE.read_text(encoding="utf-8").splitlines()
    assert len(labels) == 1000, f"{LABELS_FILE} must hold 1000 class names"
    return labels


def preprocess_for(variant: Variant, weights: LoadedWeights) -> dict:
    """The eval transform of the weights where published; else the paper's resolution at a 0.875 crop."""
    pre = default_preprocess(variant)
    recipe = weights.recipe
    if recipe is not None:
        pre.update(resize=recipe.resize, crop=recipe.crop, interpolation=recipe.interpolation)
        if recipe.mean is not None and recipe.std is not None:
            pre.update(mean=list(recipe.mean), std=list(recipe.std))
    return pre


def inputs_digest(variant: Variant, weights_spec: str, weights: LoadedWeights, preprocess: dict) -> str:
    """What determines the built files: a rebuild with the same digest would write the same model."""
    facts = {
        "variant": {k: v for k, v in vars(variant).items() if k != "extra"},
        "weights_spec": weights_spec,
        "weights_source": weights.source,
        "weights_sha256": weights.sha256,
        "weights_format": weights.format.name,
        "preprocess": preprocess,
        "tool": __version__,
        "code": _build_code_digest(),
        "opset": OPSET,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _build_code_digest() -> str:
    """A change to the build code (the network, export, weights conversion) must invalidate old builds."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in FP32_IRRELEVANT:
            continue
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def read_manifest(repo: Path, name: str) -> dict | None:
    path = repo / name / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(repo: Path, name: str, digest: str) -> bool:
    manifest = read_manifest(repo, name)
    if not manifest or manifest.get("build", {}).get("inputs_digest") != digest:
        return False
    onnx_path = repo / name / ONNX_FILE
    return onnx_path.is_file() and sha256_of(onnx_path) == manifest.get("onnx", {}).get("sha256")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def make_manifest(
    variant: Variant,
    weights: LoadedWeights,
    preprocess: dict,
    params: int,
    macs: int,
    onnx_path: Path,
    parity: Parity,
    digest: str,
) -> dict:
    crop = preprocess["crop"]
    recipe = weights.recipe
    reference = None
    if weights.pretrained and recipe is not None and recipe.top1 is not None:
        reference = {"top1": recipe.top1, "top5": recipe.top5, "dataset": "ImageNet-1k val", "source": recipe.accuracy_source}
    return {
        "schema_version": SCHEMA_VERSION,
        "name": variant.name,
        "family": variant.family,
        "variant": variant.base_variant,
        "phi": variant.phi,
        "width_mult": variant.width_mult,
        "depth_mult": variant.depth_mult,
        "resolution": variant.resolution,
        "dropout": variant.dropout,
        "bn_eps": variant.bn_eps,
        "padding": weights.format.padding,
        "preprocess": preprocess,
        "params": params,
        "macs": macs,
        "macs_note": "multiply-adds for one image at crop x crop (the paper's 'FLOPs')",
        "weights": {
            "source": weights.source, "sha256": weights.sha256, "pretrained": weights.pretrained,
            "format": weights.format.name, "notes": weights.notes,
        },
        "accuracy": {"reference": reference, "measured": None},
        "onnx": {
            "file": ONNX_FILE,
            "opset": OPSET,
            "sha256": sha256_of(onnx_path),
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, crop, crop], "dtype": "float32"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", 1000], "dtype": "float32"},
            "parity": parity.as_dict(),
        },
        "labels": imagenet_labels(),
        "build": {
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs_digest": digest,
        },
    }


class StagedModel:
    """A temporary sibling folder that becomes `repo/<name>` only on commit(), so readers never see half a model."""

    def __init__(self, repo: Path, name: str) -> None:
        self.repo = repo
        self.name = name
        repo.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=repo, prefix=f".staging-{name}-"))
        # mkdtemp makes the folder private; a server running as another user must be able to read it.
        os.chmod(self.path, 0o755)

    def commit(self, manifest: dict) -> Path:
        tmp_manifest = self.path / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp_manifest, self.path / MANIFEST)
        for f in self.path.iterdir():
            _fsync(f)
        final = self.repo / self.name
        old = None
        if final.exists():
            old = self.repo / f".old-{self.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(self.path, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


BUILDING_FILE = ".building.json"  # app/engine/building.py reads it under the same name


class BuildAnnouncement:
    """Tells a server watching the repository which models this build has still to write (`/health/ready`
    lists them): written at the start, rewritten as each model lands, removed at the end, whatever the end."""

    def __init__(self, repo: Path, names: list[str]) -> None:
        self.path = repo / BUILDING_FILE
        self.left = list(names)
        repo.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> BuildAnnouncement:
        self._write()
        return self

    def done(self, name: str) -> None:
        if name in self.left:
            self.left.remove(name)
        self._write()

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        import socket

        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "models": self.left}) + "\n")
        os.replace(tmp, self.path)  # a reader sees the old list or the new one
