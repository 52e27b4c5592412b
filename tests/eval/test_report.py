"""`effnet report`: the plots and accuracy.md from a repository with real and random-weight models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from effnet_serve.tools.eval_cli import main


@pytest.fixture
def mixed_repo(lite0_repo, tiny_repo, tmp_path, photo_sets) -> Path:
    """Lite0 (real weights) and tiny (random), both evaluated on the photo set."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(lite0_repo / "lite0", repo / "lite0")
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    for name in ("lite0", "tiny"):
        assert main(["eval", "--model", name, "--repo", str(repo), "--data", str(photo_sets["folder"]), "--quiet", "--name", "photos"]) == 0
    (repo / ".staging-x-123").mkdir()  # a build in progress is not a model
    return repo


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_report_draws_both_plots_and_the_table(mixed_repo, tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "test box", "models": {
        "lite0": {"p50_ms": 9.5, "p95_ms": 12.0, "img_per_s": 100.0},
        "tiny": {"p50_ms": 1.1},
    }}))
    out = tmp_path / "docs"
    assert main(["report", "--repo", str(mixed_repo), "--bench", str(bench), "--out", str(out)]) == 0
    w, h = _png(out / "accuracy_vs_macs.png")
    assert w > 400 and h > 300
    _png(out / "accuracy_vs_latency.png")
    md = (out / "accuracy.md").read_text()
    assert "![Accuracy vs MACs](accuracy_vs_macs.png)" in md and "![Accuracy vs latency](accuracy_vs_latency.png)" in md

    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model") and "---" not in line]
    models = [line.split("|")[1].strip() for line in table]
    assert models[:2] == ["tiny", "lite0"]  # sorted by MACs; then the latency table
    lite0 = table[1]
    manifest = json.loads((mixed_repo / "lite0" / "manifest.json").read_text())
    measured = manifest["accuracy"]["measured"]
    assert f"{measured['top1']:.1f} [{measured['top1_ci95'][0]:.1f}, {measured['top1_ci95'][1]:.1f}]" in lite0
    assert f"{manifest['accuracy']['reference']['top1']:.1f}" in lite0
    assert "| 224 |" in lite0 and "pretrained" in lite0 and "photos, n=" in lite0
    assert "plumbing only" in table[0] and "random" in table[0]
    assert "## Latency" in md and "test box" in md and "9.50" in md
    assert "Wilson" in md


def test_report_without_bench_and_with_notes(mixed_repo, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("The photo set is five images.\n")
    out = tmp_path / "docs"
    assert main(["report", "--repo", str(mixed_repo), "--out", str(out), "--notes", str(notes), "--command", "make docs"]) == 0
    assert (out / "accuracy_vs_macs.png").is_file() and not (out / "accuracy_vs_latency.png").exists()
    md = (out / "accuracy.md").read_text()
    assert "The photo set is five images." in md and "`make docs`" in md and "## Latency" not in md


def test_report_refuses_bad_input(mixed_repo, tmp_path):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"models": {"lite0": {"p95_ms": 3}}}))
    assert main(["report", "--repo", str(mixed_repo), "--bench", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert main(["report", "--repo", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
