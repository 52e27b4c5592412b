"""Compound scaling: from (width, depth, resolution) coefficients to a concrete network layout.

Pure Python (no torch), so the family table can be listed and validated anywhere.
Numbers are the EfficientNet paper's (Tan & Le, 2019) and its published per-variant table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# Compound-scaling constants found by the paper's grid search on B0 (alpha * beta^2 * gamma^2 ~ 2).
ALPHA_DEPTH = 1.2
BETA_WIDTH = 1.1
GAMMA_RESOLUTION = 1.15
BASE_RESOLUTION = 224

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Lite weights were trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
# The usual eval crop ratio (224 of 256) when nothing better is known for the weights.
DEFAULT_CROP_RATIO = 0.875


@dataclass(frozen=True)
class StageSpec:
    """One row of the B0 baseline (paper Table 1): MBConv expand ratio, kernel, stride, channels, repeats."""

    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int


B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 32, 16, 1),
    StageSpec(6, 3, 2, 16, 24, 2),
    StageSpec(6, 5, 2, 24, 40, 2),
    StageSpec(6, 3, 2, 40, 80, 3),
    StageSpec(6, 5, 1, 80, 112, 3),
    StageSpec(6, 5, 2, 112, 192, 4),
    StageSpec(6, 3, 1, 192, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
SE_RATIO = 0.25
NUM_CLASSES = 1000


def round_channels(channels: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor`, never more than 10% below the target (hardware-friendly widths)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, depth_mult: float) -> int:
    return int(math.ceil(repeats * depth_mult))


def round_resolution(resolution: float, multiple: int = 8) -> int:
    return max(multiple, int(round(resolution / multiple)) * multiple)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block as built: its position (stage, index) gives its torchvision parameter names."""

    stage: int
    index: int
    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    expanded_channels: int
    out_channels: int
    se_channels: int  # 0 when the block has no squeeze-excitation (Lite)


@dataclass(frozen=True)
class Variant:
    """Everything that defines one network of the family, before weights."""

    name: str
    family: str  # "efficientnet" or "efficientnet-lite"
    width_mult: float
    depth_mult: float
    resolution: int
    dropout: float
    phi: float | None = None
    bn_eps: float = 1e-5
    base_variant: str = "custom"
    # Lite keeps the stem, the head and the first/last stages' repeats fixed while scaling.
    fixed_stem_head: bool = False
    squeeze_excitation: bool = True
    activation: str = "silu"  # "silu" or "relu6"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_lite(self) -> bool:
        return self.family == "efficientnet-lite"

    def stages(self) -> list[StageSpec]:
        last = len(B0_STAGES) - 1
        scaled = []
        for i, s in enumerate(B0_STAGES):
            keep_depth = self.fixed_stem_head and i in (0, last)
            repeats = s.repeats if keep_depth else round_repeats(s.repeats, self.depth_mult)
            in_ch = s.in_channels
            if i == 0 and self.fixed_stem_head:
                in_ch = STEM_CHANNELS
            else:
                in_ch = round_channels(s.in_channels * self.width_mult)
            scaled.append(
                replace(s, in_channels=in_ch, out_channels=round_channels(s.out_channels * self.width_mult), repeats=repeats)
            )
        return scaled

    @property
    def stem_channels(self) -> int:
        return self.stages()[0].in_channels

    @property
    def head_channels(self) -> int:
        if self.fixed_stem_head:
            return HEAD_CHANNELS
        # torchvision's B-models use 4x the last stage's width (= round(1280 * w) for the published table).
        return 4 * self.stages()[-1].out_channels

    def blocks(self) -> list[BlockSpec]:
        out = []
        for stage_idx, s in enumerate(self.stages()):
            for j in range(s.repeats):
                in_ch = s.in_channels if j == 0 else s.out_channels
                expanded = round_channels(in_ch * s.expand_ratio)
                se = max(1, int(in_ch * SE_RATIO)) if self.squeeze_excitation else 0
                out.append(
                    BlockSpec(
                        stage=stage_idx + 1,
                        index=j,
                        expand_ratio=s.expand_ratio,
                        kernel=s.kernel,
                        stride=s.stride if j == 0 else 1,
                        in_channels=in_ch,
                        expanded_channels=expanded,
                        out_channels=s.out_channels,
                        se_channels=se,
                    )
                )
        return out


# Published per-variant coefficients: (width, depth, resolution, dropout).
B_TABLE: dict[str, tuple[float, float, int, float]] = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}
# The phi each B-variant roughly corresponds to (the published table was hand-rounded, so it is
# recorded for orientation only; the table's coefficients are what is built).
B_PHI = {"b0": 0.0, "b1": 0.5, "b2": 1.0, "b3": 2.0, "b4": 3.0, "b5": 4.0, "b6": 5.0, "b7": 6.0, "b8": 7.0}
# B8 is not in the paper: it came with the AdvProp checkpoints (Xie et al., 2020), which efficientnet_pytorch
# ships. Buildable by name, never part of the default set.
B8_TABLE: dict[str, tuple[float, float, int, float]] = {"b8": (2.2, 3.6, 672, 0.5)}
LITE_TABLE: dict[str, tuple[float, float, int, float]] = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
# Paper's Table 2 figures, to check our construction against: (params, multiply-adds).
PAPER_PARAMS_MACS = {
    "b0": (5.3e6, 0.39e9),
    "b1": (7.8e6, 0.70e9),
    "b2": (9.2e6, 1.0e9),
    "b3": (12e6, 1.8e9),
    "b4": (19e6, 4.2e9),
    "b5": (30e6, 9.9e9),
    "b6": (43e6, 19e9),
    "b7": (66e6, 37e9),
}

DEFAULT_MODEL_SET = tuple(B_TABLE) + ("lite0", "lite1", "lite2")
KNOWN_VARIANTS = tuple(B_TABLE) + tuple(B8_TABLE) + tuple(LITE_TABLE)


def b_variant(name: str) -> Variant:
    width, depth, res, dropout = B_TABLE.get(name) or B8_TABLE[name]
    # torchvision's B5..B7 weights are TF ports, trained with BatchNorm eps 1e-3 (B8 exists only as one).
    eps = 1e-3 if name in ("b5", "b6", "b7", "b8") else 1e-5
    return Variant(name, "efficientnet", width, depth, res, dropout, phi=B_PHI[name], bn_eps=eps, base_variant=name)


def lite_variant(name: str) -> Variant:
    width, depth, res, dropout = LITE_TABLE[name]
    return Variant(
        name,
        "efficientnet-lite",
        width,
        depth,
        res,
        dropout,
        bn_eps=1e-3,
        base_variant=name,
        fixed_stem_head=True,
        squeeze_excitation=False,
        activation="relu6",
        mean=LITE_MEAN,
        std=LITE_STD,
    )


def named_variant(name: str) -> Variant:
    if name in B_TABLE or name in B8_TABLE:
        return b_variant(name)
    if name in LITE_TABLE:
        return lite_variant(name)
    raise KeyError(f"unknown variant {name!r}; known: {', '.join(KNOWN_VARIANTS)}")


def phi_variant(phi: float, name: str | None = None, dropout: float | None = None) -> Variant:
    """The compound-scaled network for any phi: d = alpha^phi, w = beta^phi, r = 224 * gamma^phi."""
    depth = ALPHA_DEPTH**phi
    width = BETA_WIDTH**phi
    res = round_resolution(BASE_RESOLUTION * GAMMA_RESOLUTION**phi)
    if dropout is None:
        # Interpolate the published dropout schedule (0.2 at B0 up to 0.5 at B7): training-only, recorded.
        dropout = round(min(0.5, max(0.2, 0.2 + 0.05 * phi)), 3)
    return Variant(
        name or f"phi{phi:g}",
        "efficientnet",
        round(width, 4),
        round(depth, 4),
        res,
        dropout,
        phi=phi,
        bn_eps=1e-5,
    )


def custom_variant(
    name: str,
    width: float,
    depth: float,
    resolution: int,
    dropout: float = 0.2,
    lite: bool = False,
) -> Variant:
    base = lite_variant("lite0") if lite else b_variant("b0")
    return replace(
        base,
        name=name,
        width_mult=width,
        depth_mult=depth,
        resolution=int(resolution),
        dropout=dropout,
        phi=None,
        base_variant="custom",
    )


def default_preprocess(variant: Variant) -> dict:
    """The eval transform used when the weights carry no recipe of their own: resize to res/0.875, crop res."""
    crop = variant.resolution
    resize = int(math.floor(crop / DEFAULT_CROP_RATIO)) if not variant.is_lite else crop + 32
    return {
        "resize": resize,
        "crop": crop,
        "interpolation": "bicubic",
        "mean": list(variant.mean),
        "std": list(variant.std),
    }


def _conv_out(size: int, stride: int) -> int:
    # Both paddings (symmetric (k - 1) // 2 with odd k, and TF "SAME") give ceil(size / stride).
    return -(-size // stride)


def count_params_macs(variant: Variant, resolution: int | None = None, num_classes: int = NUM_CLASSES) -> tuple[int, int]:
    """(params, multiply-adds for one image) from the layout alone, no network built.

    Convolutions and the classifier count, as in the paper; BatchNorm counts 2 parameters per
    channel (its statistics are buffers). tests/build_step checks this against hooks on real modules.
    """
    size = _conv_out(resolution or variant.resolution, 2)
    stem = variant.stem_channels
    params = 3 * stem * 9 + 2 * stem
    macs = size * size * 3 * stem * 9
    for b in variant.blocks():
        if b.expanded_channels != b.in_channels:
            params += b.in_channels * b.expanded_channels + 2 * b.expanded_channels
            macs += size * size * b.in_channels * b.expanded_channels
        size = _conv_out(size, b.stride)
        params += b.expanded_channels * b.kernel * b.kernel + 2 * b.expanded_channels
        macs += size * size * b.expanded_channels * b.kernel * b.kernel
        if b.se_channels:
            squeeze = b.expanded_channels * b.se_channels
            params += 2 * squeeze + b.se_channels + b.expanded_channels
            macs += 2 * squeeze
        params += b.expanded_channels * b.out_channels + 2 * b.out_channels
        macs += size * size * b.expanded_channels * b.out_channels
    last, head = variant.blocks()[-1].out_channels, variant.head_channels
    params += last * head + 2 * head + head * num_classes + num_classes
    macs += size * size * last * head + head * num_classes
    return params, macs
