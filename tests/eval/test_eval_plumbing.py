"""The evaluation plumbing: random-weight `tiny`, broken images, label parsing, intervals, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from eval_photos import CLASSES, WNIDS, synthetic_synsets
from prerequisites import require_module

import effnet_serve.engine.preprocess
from effnet_serve.tools.eval import (
    DatasetError,
    EvalError,
    LabelResolver,
    open_dataset,
    runner,
    topk,
    wilson,
    write_measured,
)
from effnet_serve.tools.eval.datasets import imagenet_wnids, read_synsets
from effnet_serve.tools.eval.runner import select
from effnet_serve.engine.manifest import load_manifest


@pytest.fixture
def tiny(tiny_repo, copy_repo) -> Path:
    return copy_repo(tiny_repo, "tiny")


def test_eval_uses_the_servers_preprocessing():
    assert runner.prepare is effnet_serve.engine.preprocess.prepare


def test_tiny_random_weights_exercise_the_plumbing(tiny, photo_sets, photos, run_eval):
    rc, r, err = run_eval("--model", "tiny", "--repo", tiny, "--data", photo_sets["folder"], "--batch", "2", "--confusion", "3")
    assert rc == 0, err
    assert r["size"] == len(photos) and r["model"] == "tiny"
    for k in ("top1", "top5"):
        lo, hi = r[f"{k}_ci95"]
        assert 0 <= lo <= r[k] <= hi <= 100
    assert len(r["confusion"]) <= 3
    assert all(c["count"] >= 1 and c["true"] != c["predicted"] for c in r["confusion"])
    assert load_manifest(tiny / "tiny").accuracy.measured.size == len(photos)

    # Batch size does not change a single prediction.
    _, r1, _ = run_eval("--model", "tiny", "--repo", tiny, "--data", photo_sets["folder"], "--batch", "1", "--no-write")
    _, r8, _ = run_eval("--model", "tiny", "--repo", tiny, "--data", photo_sets["folder"], "--batch", "8", "--no-write")
    assert r1["confusion"] == r8["confusion"] and r1["top5_correct"] == r8["top5_correct"]


def test_broken_images_are_counted_and_reported_not_fatal(tiny, photo_sets, photos, run_eval, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photo_sets["folder"], data)
    cls = data / WNIDS[967]
    good = next(p for p in data.rglob("*.jpg"))
    (cls / "truncated.jpg").write_bytes(good.read_bytes()[:2000])
    (cls / "garbage.png").write_bytes(b"this is not an image")
    (cls / "empty.jpeg").write_bytes(b"")
    (cls / "notes.txt").write_text("not an image extension: ignored")

    rc, r, err = run_eval("--model", "tiny", "--repo", tiny, "--data", data)
    assert rc == 0, err
    assert r["errors"] == 3 and r["size"] == len(photos) and r["images"] == len(photos) + 3
    assert {Path(e["path"]).name for e in r["error_files"]} == {"truncated.jpg", "garbage.png", "empty.jpeg"}
    assert all(e["error"] for e in r["error_files"])
    assert load_manifest(tiny / "tiny").accuracy.measured.model_extra["errors"] == 3


def test_a_set_of_only_broken_images_fails_without_writing(tiny, run_eval, tmp_path):
    (tmp_path / "d" / "0").mkdir(parents=True)
    (tmp_path / "d" / "0" / "x.jpg").write_bytes(b"nope")
    rc, r, _err = run_eval("--model", "tiny", "--repo", tiny, "--data", tmp_path / "d")
    assert rc == 1 and r["errors"] == 1 and r["size"] == 0
    assert load_manifest(tiny / "tiny").accuracy.measured is None


def test_text_output_and_unknown_model(tiny, photo_sets, capsys):
    from effnet_serve.tools.eval_cli import main

    assert main(["eval", "--model", "tiny", "--repo", str(tiny), "--data", str(photo_sets["csv"]), "--quiet", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "95% CI" in out and "img/s" in out
    assert main(["eval", "--model", "nope", "--repo", str(tiny), "--data", str(photo_sets["csv"])]) == 2
    assert main(["frobnicate"]) == 2


# --- labels and datasets ------------------------------------------------------------


def test_label_resolver_takes_index_wnid_and_name():
    res = LabelResolver(CLASSES)
    assert res.resolve("967") == res.resolve("n07920052") == res.resolve("espresso") == res.resolve("Espresso ") == 967
    assert imagenet_wnids()[0] == "n01440764"
    for bad in ("1000", "n99999999", "no such class"):
        with pytest.raises(DatasetError):
            res.resolve(bad)
    dup = LabelResolver(["crane", "crane", "heron"])
    with pytest.raises(DatasetError, match="ambiguous"):
        dup.resolve("crane")


def test_class_index_folders_and_bad_labels(tmp_path, photos):
    src = photos[0].path()
    (tmp_path / "a" / str(photos[0].label)).mkdir(parents=True)
    shutil.copyfile(src, tmp_path / "a" / str(photos[0].label) / src.name)
    ds = open_dataset(tmp_path / "a", LabelResolver(CLASSES))
    assert ds.format == "folder" and [s.label for s in ds.samples] == [photos[0].label]

    (tmp_path / "b" / "kittens").mkdir(parents=True)
    with pytest.raises(DatasetError, match="kittens"):
        open_dataset(tmp_path / "b", LabelResolver(CLASSES))

    (tmp_path / "c.csv").write_text("x.jpg,espresso\n")
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(tmp_path / "c.csv", LabelResolver(CLASSES))


def test_loc_solution_takes_the_first_wnid(photo_sets, photos):
    ds = open_dataset(photo_sets["loc"], LabelResolver(CLASSES))
    assert [s.label for s in ds.samples] == [p.label for p in photos]
    assert all(s.path.suffix == ".JPEG" for s in ds.samples)


def test_ground_truth_uses_the_devkit_order_not_the_sorted_order(photo_sets, photos):
    ds = open_dataset(photo_sets["ilsvrc"], LabelResolver(CLASSES))
    assert [s.label for s in ds.samples] == [p.label for p in photos]
    ids = synthetic_synsets()
    gt = (photo_sets["ilsvrc"] / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    assert [int(i) - 1 for i in gt] != [p.label for p in photos]  # read as indices, the labels would be wrong
    assert [WNIDS.index(ids[int(i)]) for i in gt] == [p.label for p in photos]


def test_devkit_meta_mat_is_read(tmp_path):
    sio = require_module("scipy.io", "scipy, which scikit-image (test extra) brings")
    ids = synthetic_synsets()
    rows = [(i, w, "words", 0) for i, w in sorted(ids.items())] + [(1001, "n00001740", "entity", 3)]  # a non-leaf
    rec = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    sio.savemat(tmp_path / "meta.mat", {"synsets": rec.reshape(-1, 1)})
    assert read_synsets(tmp_path / "meta.mat") == ids


def test_limit_picks_a_spread_not_the_first_n():
    from effnet_serve.tools.eval.datasets import Sample

    samples = [Sample(Path(f"{i}.jpg"), i // 10, str(i // 10)) for i in range(100)]
    picked = select(samples, 10, seed=0)
    assert len(picked) == 10 and picked == select(samples, 10, seed=0)
    assert len({s.label for s in picked}) > 3
    assert picked == sorted(picked, key=lambda s: int(s.path.stem))
    assert select(samples, 1000) == samples


# --- metrics ---------------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson(750, 1000)
    assert lo == pytest.approx(0.7222, abs=1e-4) and hi == pytest.approx(0.7758, abs=1e-4)
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_topk_is_ordered():
    logits = np.array([[0.1, 5.0, 3.0, -1.0, 4.0, 2.0, 0.0]])
    assert topk(logits, 5).tolist() == [[1, 4, 2, 5, 0]]


# --- the manifest write ------------------------------------------------------------------


def test_write_refuses_a_rebuilt_model(tiny):
    folder = tiny / "tiny"
    sha = json.loads((folder / "manifest.json").read_text())["onnx"]["sha256"]
    with pytest.raises(EvalError, match="another model.onnx"):
        write_measured(folder, {"top1": 1.0}, "0" * 64)
    write_measured(folder, {"top1": 1.0, "top5": 2.0, "dataset": "x", "size": 1, "date": "d"}, sha)
    assert load_manifest(folder).accuracy.measured.top1 == 1.0


def test_write_is_atomic_when_it_fails(tiny, monkeypatch):
    folder = tiny / "tiny"
    before = (folder / "manifest.json").read_bytes()
    sha = json.loads(before)["onnx"]["sha256"]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_measured(folder, {"top1": 1.0}, sha)
    assert (folder / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]
