"""Build one model end to end: weights -> network -> count -> ONNX -> parity -> repository."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .counting import count_macs, count_params
from .efficientnet import EfficientNet
from .export import check_parity, export_onnx
from .repository import (
    ONNX_FILE,
    StagedModel,
    inputs_digest,
    is_up_to_date,
    make_manifest,
    preprocess_for,
)
from .scaling import Variant
from .weights import LoadedWeights, WeightsError, randomize, resolve

log = logging.getLogger(__name__)

PHASES = ("weights", "network", "count", "export", "parity", "write")


@dataclass
class BuildResult:
    name: str
    skipped: bool
    path: Path
    manifest: dict | None = None


def build_model(
    variant: Variant,
    repo: Path,
    weights_spec: str = "auto",
    force: bool = False,
    cache_dir: Path | None = None,
    seed: int = 0,
    on_phase: Callable[[str], None] = lambda phase: None,
    warn: Callable[[str], None] = log.warning,
) -> BuildResult:
    on_phase("weights")
    weights = resolve(variant, weights_spec, cache_dir=cache_dir, seed=seed, warn=warn)
    preprocess = preprocess_for(variant, weights)
    crop = preprocess["crop"]
    digest = inputs_digest(variant, weights_spec, weights, preprocess)
    if not force and is_up_to_date(repo, variant.name, digest):
        return BuildResult(variant.name, True, repo / variant.name)

    on_phase("network")
    model = network_for(variant, weights, crop, seed)
    variant = model.variant

    on_phase("count")
    params = count_params(model)
    macs = count_macs(model, crop)

    staged = StagedModel(repo, variant.name)
    try:
        on_phase("export")
        onnx_path = staged.path / ONNX_FILE
        export_onnx(model, crop, onnx_path)
        on_phase("parity")
        parity = check_parity(model, onnx_path, crop, seed=seed)
        on_phase("write")
        manifest = make_manifest(variant, weights, preprocess, params, macs, onnx_path, parity, digest)
        path = staged.commit(manifest)
    except BaseException:
        staged.discard()
        raise
    return BuildResult(variant.name, False, path, manifest)


def network_for(variant: Variant, weights: LoadedWeights, crop: int, seed: int = 0) -> EfficientNet:
    """The PyTorch network that computes what the weights' own library computes, in eval mode.

    The weights' format decides padding and BatchNorm eps (build.checkpoints); the variant everything else.
    The returned model's `.variant` carries the eps actually used.
    """
    fmt = weights.format
    if fmt.bn_eps is not None:
        variant = replace(variant, bn_eps=fmt.bn_eps)
    model = EfficientNet(variant, padding=fmt.padding, input_size=crop, bn_momentum=fmt.bn_momentum)
    if weights.state_dict:
        try:
            model.load_state_dict(weights.state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise WeightsError(f"{weights.source} does not fit {variant.name}: {first}") from exc
    else:
        randomize(model, seed)
    return model.eval()
