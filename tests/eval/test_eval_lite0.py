"""`effnet eval` on Lite0 with its real ImageNet weights, over real photos, in every data layout."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from statistics import NormalDist

import pytest
from eval_photos import CORE

from effnet_serve.engine.manifest import load_manifest, verify_onnx

pytestmark = pytest.mark.timeout(300)

# What Lite0's real weights score on the package photos (tests/eval/photo_set.md), measured: top-1 is the
# hand label on these three; chelsea comes out "tiger cat" (the hand label, tabby, is third) and
# grace_hopper "academic gown" (military uniform is third). Every photo has its label in the top-5.
# A swapped channel, a wrong normalisation or a shifted label list loses several of these.
LITE0_TOP1 = {"coffee", "rocket", "cameraman"}


@pytest.fixture
def lite0(lite0_repo, copy_repo) -> Path:
    """A writable copy of the Lite0 repository: eval records its result in the manifest."""
    return copy_repo(lite0_repo, "lite0")


def _without_measured(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    m["accuracy"].pop("measured", None)
    return m


def _wilson_pct(k: int, n: int) -> list[float]:
    """The 95% Wilson score interval of k/n in percent, worked out here: (k + z²/2) / (n + z²) ± ..."""
    z = NormalDist().inv_cdf(0.975)
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return [100 * max(0.0, centre - half), 100 * min(1.0, centre + half)]


def _check_ci(r: dict, k: str) -> None:
    """`k` (top1 or top5): the accuracy and its interval are the ones its counts give."""
    correct, n = r[f"{k}_correct"], r["size"]
    assert r[k] == pytest.approx(100 * correct / n, abs=0.006)
    assert r[f"{k}_ci95"] == pytest.approx(_wilson_pct(correct, n), abs=0.006)  # reported to 2 decimals


def _expected(photos) -> tuple[int, int]:
    """(top-1, top-5) Lite0 gets on the photos that are installed."""
    return len(LITE0_TOP1 & {p.key for p in photos}), len(photos)


def test_the_interval_worked_out_here_is_wilsons():
    """Known values, so _wilson_pct is not just the same mistake twice: 3/5 is [23.1%, 88.2%] (photo_set.md)."""
    assert _wilson_pct(3, 5) == pytest.approx([23.07, 88.24], abs=0.01)
    assert _wilson_pct(0, 10) == pytest.approx([0.0, 27.75], abs=0.01)
    assert _wilson_pct(750, 1000) == pytest.approx([72.23, 77.58], abs=0.01)


def test_folder_layout_scores_the_photos_and_records_them(lite0, photo_sets, photos, run_eval, tmp_path):
    folder = lite0 / "lite0"
    before_text = (folder / "manifest.json").read_text()
    before = json.loads(before_text)
    mode = (folder / "manifest.json").stat().st_mode & 0o777
    preds = tmp_path / "pred.csv"

    rc, r, err = run_eval("--model", "lite0", "--repo", lite0, "--data", photo_sets["folder"], "--predictions", preds)
    assert rc == 0, err
    n = len(photos)
    assert r["size"] == r["images"] == n and r["errors"] == 0 and r["format"] == "folder"
    # What the real weights get, photo by photo.
    assert (r["top1_correct"], r["top5_correct"]) == _expected(photos)
    _check_ci(r, "top1")
    _check_ci(r, "top5")
    assert r["img_per_s"] > 0 and r["model_img_per_s"] > 0
    assert len(r["confusion"]) == n - r["top1_correct"]

    rows = {Path(row["path"]).parent.name + "/" + Path(row["path"]).name: row for row in csv.DictReader(preds.open())}
    by_key = {p.key: rows[f"{p.wnid}/{p.file}"] for p in photos}
    assert by_key["coffee"]["top5_names"].split("|")[0] == "espresso"
    for p in photos:
        assert by_key[p.key]["top5_correct"] == "1", by_key[p.key]
        assert by_key[p.key]["top1_correct"] == ("1" if p.key in LITE0_TOP1 else "0"), by_key[p.key]
    assert set(CORE) <= set(by_key)

    after = json.loads((folder / "manifest.json").read_text())
    m = after["accuracy"]["measured"]
    assert {k: m[k] for k in ("top1", "top5", "top1_ci95", "top5_ci95", "size")} == {
        k: r[k] for k in ("top1", "top5", "top1_ci95", "top5_ci95", "size")
    }
    assert m["dataset"] == photo_sets["folder"].name and m["date"] and m["errors"] == 0
    # Every other field untouched, in the same order; the server still loads and verifies it.
    assert _without_measured(after) == _without_measured(before)
    assert list(after) == list(before)
    assert after["accuracy"]["reference"] == before["accuracy"]["reference"]
    assert (folder / "manifest.json").stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]  # no temp file left
    loaded = load_manifest(folder)
    verify_onnx(folder, loaded)
    assert loaded.accuracy.measured.top1 == r["top1"]


@pytest.mark.parametrize("layout", ["csv", "valtxt", "loc", "ilsvrc"])
def test_other_layouts_give_the_same_labels(lite0, photo_sets, photos, run_eval, layout):
    rc, r, err = run_eval("--model", "lite0", "--repo", lite0, "--data", photo_sets[layout], "--name", f"photos-{layout}")
    assert rc == 0, err
    assert r["format"] == layout and r["size"] == len(photos) and r["missing"] == 0
    # Re-encoded as JPEG (quality 95) for the ImageNet-val layouts: the same photos right.
    assert (r["top1_correct"], r["top5_correct"]) == _expected(photos)
    _check_ci(r, "top1")
    _check_ci(r, "top5")
    assert load_manifest(lite0 / "lite0").accuracy.measured.dataset == f"photos-{layout}"


def test_label_files_can_be_given_directly(lite0, photo_sets, run_eval):
    gt = photo_sets["ilsvrc"] / "ILSVRC2012_validation_ground_truth.txt"
    rc, r, err = run_eval("--model", "lite0", "--repo", lite0, "--data", gt, "--no-write")
    assert rc == 0, err
    assert r["format"] == "ilsvrc" and r["dataset"] == "ImageNet-1k val"
    assert r["manifest_written"] is None
    assert load_manifest(lite0 / "lite0").accuracy.measured is None


def test_limit_scores_a_fixed_subset(lite0, photo_sets, run_eval):
    rc, r, err = run_eval("--model", "lite0", "--repo", lite0, "--data", photo_sets["valtxt"], "--limit", "2", "--batch", "1")
    assert rc == 0, err
    assert r["size"] == r["images"] == 2
    assert load_manifest(lite0 / "lite0").accuracy.measured.size == 2
    rc2, r2, _ = run_eval("--model", "lite0", "--repo", lite0, "--data", photo_sets["valtxt"], "--limit", "2", "--no-write")
    assert rc2 == 0 and r2["top1_correct"] == r["top1_correct"]  # same subset, any batch size


def test_ground_truth_without_the_devkit_mapping_is_refused(lite0, photo_sets, run_eval, tmp_path):
    data = tmp_path / "val"
    data.mkdir()
    for f in photo_sets["ilsvrc"].iterdir():
        if f.name != "map_clsloc.txt":
            (data / f.name).write_bytes(f.read_bytes())
    rc, r, err = run_eval("--model", "lite0", "--repo", lite0, "--data", data)
    assert rc == 2 and r is None
    assert "meta.mat" in err and "map_clsloc.txt" in err
    assert load_manifest(lite0 / "lite0").accuracy.measured is None


def test_eval_refuses_a_model_whose_onnx_does_not_match(lite0, photo_sets, run_eval):
    onnx = lite0 / "lite0" / "model.onnx"
    os.chmod(onnx, 0o644)
    with onnx.open("ab") as f:
        f.write(b"\0")
    rc, _r, err = run_eval("--model", "lite0", "--repo", lite0, "--data", photo_sets["folder"])
    assert rc == 1 and "does not match" in err
