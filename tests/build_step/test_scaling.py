"""Compound scaling and the family table, checked against numbers from outside the code under test:
the paper's, written out here, and torchvision's, recorded by tests/data/generate_preprocess_reference.py
from its weight metadata (tests/data/torchvision_recipes.json)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effnet_build.recipes import LITE_PACKAGES, TORCHVISION_V1
from effnet_build.scaling import (
    B_TABLE,
    LITE_MEAN,
    LITE_STD,
    PAPER_PARAMS_MACS,
    count_params_macs,
    named_variant,
    phi_variant,
    round_channels,
    round_repeats,
)

TORCHVISION = json.loads((Path(__file__).parents[1] / "data" / "torchvision_recipes.json").read_text())["models"]
B_NAMES = [f"b{i}" for i in range(8)]
# The published per-variant coefficients (width, depth, resolution, dropout), as in the paper's
# reference implementation (efficientnet_builder.efficientnet_params).
PAPER_COEFFICIENTS = {
    "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3), "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4), "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5),
}
# The paper's Table 2: parameters and FLOPs (multiply-adds).
PAPER_TABLE_2 = {
    "b0": (5.3e6, 0.39e9), "b1": (7.8e6, 0.70e9), "b2": (9.2e6, 1.0e9), "b3": (12e6, 1.8e9),
    "b4": (19e6, 4.2e9), "b5": (30e6, 9.9e9), "b6": (43e6, 19e9), "b7": (66e6, 37e9),
}


@pytest.mark.parametrize("target", [8, 12, 16, 20.4, 35.2, 44.8, 100, 448, 1792.0, 3.0])
def test_round_channels_is_a_multiple_of_8_and_never_below_90_percent(target):
    rounded = round_channels(target)
    assert rounded % 8 == 0
    assert rounded >= 0.9 * target
    assert abs(rounded - target) <= 8


def test_repeats_round_up():
    assert [round_repeats(n, 1.8) for n in (1, 2, 2, 3, 3, 4, 1)] == [2, 4, 4, 6, 6, 8, 2]


def test_phi_variant_follows_compound_scaling():
    v = phi_variant(2.0)
    assert v.depth_mult == pytest.approx(1.2**2, rel=1e-3)
    assert v.width_mult == pytest.approx(1.1**2, rel=1e-3)
    assert v.resolution == 296  # 224 * 1.15^2 = 296.2, to a multiple of 8
    below = phi_variant(-1.0)
    assert below.resolution < 224 and below.width_mult < 1 and below.depth_mult < 1


def test_b5_to_b7_use_tf_batchnorm_epsilon():
    assert {n: named_variant(n).bn_eps for n in B_TABLE} == {
        "b0": 1e-5, "b1": 1e-5, "b2": 1e-5, "b3": 1e-5, "b4": 1e-5, "b5": 1e-3, "b6": 1e-3, "b7": 1e-3,
    }


def test_lite_keeps_stem_head_and_outer_stages_fixed():
    lite4 = named_variant("lite4")
    stages = lite4.stages()
    assert lite4.stem_channels == 32 and lite4.head_channels == 1280
    assert stages[0].repeats == 1 and stages[-1].repeats == 1
    assert stages[1].repeats == round_repeats(2, 1.8)
    assert all(b.se_channels == 0 for b in lite4.blocks())


def test_family_constants_are_the_papers():
    assert B_TABLE == PAPER_COEFFICIENTS
    assert PAPER_PARAMS_MACS == PAPER_TABLE_2


def test_effnet_variants_json_matches_the_paper_and_torchvision():
    out = subprocess.run([sys.executable, "-m", "effnet_serve", "variants", "--json"], check=True, capture_output=True, text=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(B_NAMES) <= set(rows)
    for name in B_NAMES:
        row, (paper_params, paper_macs) = rows[name], PAPER_TABLE_2[name]
        assert (row["width"], row["depth"], row["resolution"], row["dropout"]) == PAPER_COEFFICIENTS[name]
        assert abs(row["params"] / paper_params - 1) <= 0.05, (name, row["params"])
        assert abs(row["macs"] / paper_macs - 1) <= 0.10, (name, row["macs"])
        # Exactly as torchvision counts them, and with torchvision's classifier dropout.
        assert row["params"] == TORCHVISION[name]["num_params"], name
        assert row["dropout"] == TORCHVISION[name]["dropout"], name


@pytest.mark.parametrize("name", B_NAMES)
def test_multiply_adds_equal_torchvisions_at_its_eval_crop(name):
    """torchvision publishes GFLOPS (multiply-adds, to 3 decimals) at its own eval crop (B2: 288, not 260)."""
    _, macs = count_params_macs(named_variant(name), TORCHVISION[name]["crop"])
    assert macs / 1e9 == pytest.approx(TORCHVISION[name]["gflops"], abs=0.0005 + 1e-9)


@pytest.mark.parametrize("name", B_NAMES)
def test_torchvision_recipes_are_torchvisions(name):
    ours, tv = TORCHVISION_V1[name], TORCHVISION[name]
    assert (ours.resize, ours.crop, ours.interpolation) == (tv["resize"], tv["crop"], tv["interpolation"])
    assert (ours.top1, ours.top5) == (tv["top1"], tv["top5"])
    assert tv["mean"] == [0.485, 0.456, 0.406] and tv["std"] == [0.229, 0.224, 0.225]
    # The same port (rwightman for B0..B4, lukemelas for B5..B7, which decides the BatchNorm eps).
    # Not the hash suffix: build/recipes.py names older files than torchvision 0.29 lists
    # (b0: -3dd342df vs -7f5810bc); which file the build fetches is build/weights.py's to decide.
    family = lambda url: url.rsplit("/", 1)[1].rsplit("-", 1)[0]  # noqa: E731
    assert family(ours.source) == family(tv["url"]), (ours.source, tv["url"])


def test_lite_recipes_are_the_lite_releases():
    """Crop at the Lite resolution after resizing to crop + 32, bicubic, inputs scaled to [-1, 1]."""
    assert {n: (r.resize, r.crop, r.interpolation) for n, r in LITE_PACKAGES.items()} == {
        "lite0": (256, 224, "bicubic"), "lite1": (272, 240, "bicubic"), "lite2": (292, 260, "bicubic"),
    }
    assert LITE_MEAN == (0.5, 0.5, 0.5) and LITE_STD == (0.5, 0.5, 0.5)
    assert {n: named_variant(n).resolution for n in LITE_PACKAGES} == {"lite0": 224, "lite1": 240, "lite2": 260}
