"""Compound scaling and the family table, checked against the paper's numbers."""

import json
import subprocess
import sys

import pytest

from build.scaling import (
    B_TABLE,
    PAPER_PARAMS_MACS,
    named_variant,
    phi_variant,
    round_channels,
    round_repeats,
)


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


def test_effnet_variants_json_matches_the_paper():
    out = subprocess.run([sys.executable, "-m", "app", "variants", "--json"], check=True, capture_output=True, text=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(B_TABLE) <= set(rows)
    for name, (paper_params, paper_macs) in PAPER_PARAMS_MACS.items():
        row = rows[name]
        assert abs(row["params"] / paper_params - 1) <= 0.05, (name, row["params"])
        assert abs(row["macs"] / paper_macs - 1) <= 0.10, (name, row["macs"])
        assert (row["width"], row["depth"], row["resolution"], row["dropout"]) == B_TABLE[name]
    # B0 exactly as torchvision counts it.
    assert rows["b0"]["params"] == 5_288_548
