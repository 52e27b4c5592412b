"""build/scaling.py against the libraries and releases it reproduces, field by field: added for the
mutants that survived `make mutation` (docs/testing.md), which showed that a variant's family,
activation, BatchNorm eps, dropout, name or default recipe could change with every test still green.

Oracles, none imported from the code under test:
- tests/data/lukemelas_keys.json.gz: the state-dict shapes of efficientnet_pytorch b0..b8 and
  efficientnet-lite-pytorch lite0..lite4 (tests/data/generate_reference_logits.py), from which every
  block's widths, expand ratio, kernel and squeeze-excitation follow, and the parameter count;
- tests/data/torchvision_keys.json: torchvision's parameter names for b0, b4, b7, whose
  `features.<stage>.<index>` are the positions the build names its blocks by;
- the published tables, written out here: torchvision's and efficientnet_pytorch's B-variants, the
  EfficientNet-Lite release (TF efficientnet_lite_builder: ReLU6, no SE, stem and head fixed, eps 1e-3),
  the phi rule of the README.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from effnet_build.scaling import count_params_macs, custom_variant, default_preprocess, named_variant, phi_variant, round_channels

DATA = Path(__file__).parents[1] / "data"
LAYOUTS = json.loads(gzip.open(DATA / "lukemelas_keys.json.gz", "rt").read())["models"]
TORCHVISION_KEYS = json.loads((DATA / "torchvision_keys.json").read_text())["models"]
NAMES = [f"b{i}" for i in range(9)] + [f"lite{i}" for i in range(5)]

# (width, depth, resolution, dropout, BatchNorm eps): torchvision's B0..B7 (eps 1e-3 for its TF-ported
# B5..B7), efficientnet_pytorch's B8 (AdvProp), the Lite release.
PUBLISHED = {
    "b0": (1.0, 1.0, 224, 0.2, 1e-5), "b1": (1.0, 1.1, 240, 0.2, 1e-5), "b2": (1.1, 1.2, 260, 0.3, 1e-5),
    "b3": (1.2, 1.4, 300, 0.3, 1e-5), "b4": (1.4, 1.8, 380, 0.4, 1e-5), "b5": (1.6, 2.2, 456, 0.4, 1e-3),
    "b6": (1.8, 2.6, 528, 0.5, 1e-3), "b7": (2.0, 3.1, 600, 0.5, 1e-3), "b8": (2.2, 3.6, 672, 0.5, 1e-3),
    "lite0": (1.0, 1.0, 224, 0.2, 1e-3), "lite1": (1.0, 1.1, 240, 0.2, 1e-3), "lite2": (1.1, 1.2, 260, 0.3, 1e-3),
    "lite3": (1.2, 1.4, 280, 0.3, 1e-3), "lite4": (1.4, 1.8, 300, 0.3, 1e-3),
}
# The compound coefficient each B-variant is listed with (the README's `effnet variants` table).
B_PHI = {"b0": 0.0, "b1": 0.5, "b2": 1.0, "b3": 2.0, "b4": 3.0, "b5": 4.0, "b6": 5.0, "b7": 6.0, "b8": 7.0}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE_INPUTS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [-1, 1]
# The Lite releases' eval recipe (resize to crop + 32), and the usual 0.875 crop ratio for B-layouts.
LITE_RECIPES = {"lite0": (256, 224), "lite1": (272, 240), "lite2": (292, 260), "lite3": (312, 280), "lite4": (332, 300)}


def reference_blocks(keys: dict) -> list[tuple[int, int, int, int, int, int]]:
    """(in, expanded, out, kernel, se, expand ratio) per block, from the reference library's weight shapes."""
    out, i = [], 0
    while f"_blocks.{i}._depthwise_conv.weight" in keys:
        p = f"_blocks.{i}."
        dw = keys[p + "_depthwise_conv.weight"]  # [expanded, 1, k, k]
        expanded = dw[0]
        cin = keys[p + "_expand_conv.weight"][1] if p + "_expand_conv.weight" in keys else expanded
        se = keys[p + "_se_reduce.weight"][0] if p + "_se_reduce.weight" in keys else 0
        out.append((cin, expanded, keys[p + "_project_conv.weight"][0], dw[2], se, expanded // cin))
        i += 1
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_named_layout_is_its_reference_librarys(name):
    keys, v = LAYOUTS[name], named_variant(name)
    assert [(b.in_channels, b.expanded_channels, b.out_channels, b.kernel, b.se_channels, b.expand_ratio)
            for b in v.blocks()] == reference_blocks(keys)
    assert v.stem_channels == keys["_conv_stem.weight"][0] and keys["_conv_stem.weight"][1:] == [3, 3, 3]
    assert v.head_channels == keys["_conv_head.weight"][0] == keys["_fc.weight"][1]
    assert keys["_conv_head.weight"][1] == v.blocks()[-1].out_channels
    trained = sum(math.prod(s) for k, s in keys.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert count_params_macs(v)[0] == trained


@pytest.mark.parametrize("name", ["b0", "b4", "b7"])
def test_blocks_sit_where_torchvision_names_them(name):
    """Block (stage, index) is `features.<stage>.<index>` in torchvision's state dict: the names a
    torchvision checkpoint loads by."""
    positions = sorted({tuple(int(p) for p in k.split(".")[1:3]) for k in TORCHVISION_KEYS[f"efficientnet_{name}"]
                        if k.startswith("features.") and k.split(".")[1] not in ("0", "8")})
    assert [(b.stage, b.index) for b in named_variant(name).blocks()] == positions


def test_a_width_of_exactly_90_percent_of_the_target_is_kept():
    """torchvision's and TF's rounding (_make_divisible, round_filters) add a divisor only when the rounded
    width is *below* 90% of the target."""
    assert [round_channels(r / 0.9) for r in (8, 16, 24, 32)] == [8, 16, 24, 32]
    assert 0.9 * (32 / 0.9) == 32  # the boundary is hit exactly, not by rounding luck


@pytest.mark.parametrize("name", NAMES)
def test_every_named_variant_carries_its_published_settings(name):
    v = named_variant(name)
    width, depth, res, dropout, eps = PUBLISHED[name]
    assert (v.name, v.width_mult, v.depth_mult, v.resolution, v.dropout, v.bn_eps) == (name, width, depth, res, dropout, eps)
    assert v.base_variant == name
    if name.startswith("lite"):
        assert (v.family, v.is_lite, v.activation, v.squeeze_excitation, v.fixed_stem_head) == (
            "efficientnet-lite", True, "relu6", False, True)
        assert (v.mean, v.std) == LITE_INPUTS and v.phi is None
    else:
        assert (v.family, v.is_lite, v.activation, v.squeeze_excitation, v.fixed_stem_head) == (
            "efficientnet", False, "silu", True, False)
        assert (v.mean, v.std) == IMAGENET and v.phi == B_PHI[name]


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(KeyError) as exc:
        named_variant("b9")
    assert exc.value.args[0] == (
        "unknown variant 'b9'; known: b0, b1, b2, b3, b4, b5, b6, b7, b8, lite0, lite1, lite2, lite3, lite4"
    )


def test_any_phi_is_named_scaled_and_given_the_interpolated_dropout():
    """d = 1.2^phi, w = 1.1^phi (to 4 decimals, as recorded in the manifest), r = 224 * 1.15^phi to a
    multiple of 8; dropout from 0.2 at phi 0 by 0.05 per unit of phi, capped at 0.5, to 3 decimals."""
    v = phi_variant(2.5)
    assert (v.name, v.family, v.width_mult, v.depth_mult, v.resolution, v.phi) == ("phi2.5", "efficientnet", 1.2691, 1.5774, 320, 2.5)
    assert (v.bn_eps, v.activation, v.squeeze_excitation, v.base_variant, v.is_lite) == (1e-5, "silu", True, "custom", False)
    assert (v.mean, v.std) == IMAGENET
    assert v.dropout == 0.325
    assert {phi: phi_variant(phi).dropout for phi in (-2.0, 0.0, 1 / 3, 1.0, 6.0, 10.0)} == {
        -2.0: 0.2, 0.0: 0.2, 1 / 3: 0.217, 1.0: 0.25, 6.0: 0.5, 10.0: 0.5,
    }
    assert phi_variant(1.0, name="mine").name == "mine"
    assert phi_variant(1.0, dropout=0.1).dropout == 0.1  # an explicit dropout is kept


def test_custom_variants_take_b0_or_lite0_as_the_template():
    b = custom_variant("tiny", 0.25, 0.5, 64.0)
    assert (b.name, b.width_mult, b.depth_mult, b.resolution, b.dropout, b.phi, b.base_variant) == (
        "tiny", 0.25, 0.5, 64, 0.2, None, "custom")
    assert type(b.resolution) is int
    assert (b.family, b.activation, b.bn_eps, b.squeeze_excitation, b.fixed_stem_head, b.mean) == (
        "efficientnet", "silu", 1e-5, True, False, IMAGENET[0])
    lite = custom_variant("tinylite", 0.5, 0.5, 96, dropout=0.1, lite=True)
    assert (lite.name, lite.width_mult, lite.depth_mult, lite.resolution, lite.dropout, lite.phi, lite.base_variant) == (
        "tinylite", 0.5, 0.5, 96, 0.1, None, "custom")
    assert (lite.family, lite.activation, lite.bn_eps, lite.squeeze_excitation, lite.fixed_stem_head, lite.mean) == (
        "efficientnet-lite", "relu6", 1e-3, False, True, LITE_INPUTS[0])


@pytest.mark.parametrize("name", NAMES + ["phi2.5", "tiny", "tinylite"])
def test_the_default_recipe_is_resize_to_crop_over_0875_or_the_lite_releases(name):
    variants = {"phi2.5": phi_variant(2.5), "tiny": custom_variant("tiny", 0.25, 0.25, 64),
                "tinylite": custom_variant("tinylite", 0.25, 0.25, 64, lite=True)}
    v = variants.get(name) or named_variant(name)
    crop = v.resolution
    if name in LITE_RECIPES:
        resize = LITE_RECIPES[name][0]
        assert LITE_RECIPES[name][1] == crop
    elif name == "tinylite":
        resize = 96
    else:
        resize = {224: 256, 240: 274, 260: 297, 300: 342, 380: 434, 456: 521, 528: 603, 600: 685, 672: 768,
                  320: 365, 64: 73}[crop]
    mean, std = LITE_INPUTS if name.startswith(("lite", "tinylite")) else IMAGENET
    assert default_preprocess(v) == {"resize": resize, "crop": crop, "interpolation": "bicubic",
                                     "mean": list(mean), "std": list(std)}
