"""Checkpoint layouts are recognised from their keys; anything else is refused in one line that says why."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effnet_build import recipes
from effnet_build.checkpoints import EFFICIENTNET_LITE, EFFICIENTNET_PYTORCH, TORCHVISION, CheckpointError, detect
from effnet_build.repository import preprocess_for
from effnet_build.scaling import named_variant
from effnet_build.weights import WeightsError, resolve, sha256_file

DATA = Path(__file__).resolve().parents[1] / "data"
TORCHVISION_KEYS = json.loads((DATA / "torchvision_keys.json").read_text())["models"]
LUKEMELAS_KEYS = json.loads(gzip.open(DATA / "lukemelas_keys.json.gz", "rt").read())["models"]
ROOT = Path(__file__).resolve().parents[2]


def zeros(layout: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape) for k, shape in layout.items()}


@pytest.mark.parametrize(
    "layout, expected",
    [
        (TORCHVISION_KEYS["efficientnet_b0"], TORCHVISION),
        (LUKEMELAS_KEYS["b0"], EFFICIENTNET_PYTORCH),
        (LUKEMELAS_KEYS["b8"], EFFICIENTNET_PYTORCH),
        (LUKEMELAS_KEYS["lite2"], EFFICIENTNET_LITE),
    ],
    ids=["torchvision-b0", "efficientnet_pytorch-b0", "efficientnet_pytorch-b8", "lite2"],
)
def test_each_library_layout_is_recognised_with_its_padding(layout, expected):
    fmt, _ = detect(zeros(layout))
    assert fmt is expected
    assert fmt.padding == ("symmetric" if expected is TORCHVISION else "same")


def test_a_data_parallel_prefix_is_removed():
    state = {f"module.{k}": v for k, v in zeros(LUKEMELAS_KEYS["b0"]).items()}
    fmt, stripped = detect(state)
    assert fmt is EFFICIENTNET_PYTORCH and "_conv_stem.weight" in stripped


def test_an_unknown_layout_names_the_understood_formats_and_the_keys_that_did_not_match():
    # timm's naming: a real EfficientNet checkpoint in a layout this build does not read.
    state = {"conv_stem.weight": torch.zeros(32, 3, 3, 3), "bn1.weight": torch.zeros(32),
             "blocks.0.0.conv_dw.weight": torch.zeros(32, 1, 3, 3), "classifier.weight": torch.zeros(1000, 1280)}
    with pytest.raises(CheckpointError) as err:
        detect(state)
    message = str(err.value)
    assert "\n" not in message
    assert "torchvision" in message and "efficientnet_pytorch" in message and "efficientnet-lite-pytorch" in message
    assert "'conv_stem.weight'" in message and "'bn1.weight'" in message


def test_a_mostly_known_layout_lists_only_the_keys_that_do_not_fit():
    state = zeros(TORCHVISION_KEYS["efficientnet_b0"])
    state["extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 of \d+ keys.*'extra_head.weight'$"):
        detect(state)


@pytest.mark.parametrize(
    "layout, variant",
    [(LUKEMELAS_KEYS["lite0"], "b0"), (LUKEMELAS_KEYS["b0"], "lite0"), (TORCHVISION_KEYS["efficientnet_b0"], "lite0")],
    ids=["lite-into-b0", "b0-into-lite0", "torchvision-into-lite0"],
)
def test_a_layout_of_the_other_family_is_refused(tmp_path, layout, variant):
    path = tmp_path / "ckpt.pth"
    torch.save(zeros(layout), path)
    with pytest.raises(WeightsError, match="does not fit"):
        resolve(named_variant(variant), str(path))


def test_effnet_build_refuses_an_unknown_layout_in_one_line(tmp_path):
    path = tmp_path / "mystery.pth"
    torch.save({"backbone.stem.weight": torch.zeros(8, 3, 3, 3), "head.fc.weight": torch.zeros(10, 8)}, path)
    proc = subprocess.run(
        [sys.executable, "-m", "effnet_serve.cli", "build", "--models", "b0", "--weights", str(path),
         "--repo", str(tmp_path / "repo"), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("effnet build: error: ") and "unknown checkpoint layout" in lines[0]
    assert "'backbone.stem.weight'" in lines[0]
    assert not (tmp_path / "repo" / "b0").exists()


def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a loadable PyTorch checkpoint") as err:
        resolve(named_variant("b0"), str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("table, mean", [("EFFICIENTNET_PYTORCH", [0.485, 0.456, 0.406]),
                                         ("EFFICIENTNET_PYTORCH_ADVPROP", [0.5, 0.5, 0.5])], ids=["standard", "advprop"])
def test_a_published_efficientnet_pytorch_file_is_pretrained_with_its_own_eval_transform(tmp_path, monkeypatch, table, mean):
    """A published file is recognised by its name and the sha256 prefix the name carries. The real files cannot
    be downloaded here, so the table entry is pointed at a file made here, with its true hash in its name."""
    raw = tmp_path / "raw.pth"
    torch.save(zeros(LUKEMELAS_KEYS["b0"]), raw)
    path = raw.rename(tmp_path / f"efficientnet-b0-{sha256_file(raw)[:8]}.pth")
    published = getattr(recipes, table)["b0"]
    monkeypatch.setitem(getattr(recipes, table), "b0", recipes.PretrainedRecipe(
        recipes.LUKEMELAS_URL + path.name, published.resize, published.crop, published.interpolation, published.top1,
        published.top5, published.accuracy_source, published.mean, published.std))
    weights = resolve(named_variant("b0"), str(path))
    assert weights.format is EFFICIENTNET_PYTORCH and weights.pretrained is True
    pre = preprocess_for(named_variant("b0"), weights)
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (256, 224, "bicubic")  # TF's crop_padding 32
    assert pre["mean"] == mean

    renamed = path.rename(tmp_path / "efficientnet-b0-00000000.pth")  # same bytes, wrong hash in the name
    assert resolve(named_variant("b0"), str(renamed)).pretrained is False
