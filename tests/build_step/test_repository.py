"""`effnet build` writes complete, batch-consistent, atomically placed models."""

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from effnet_build import pipeline
from effnet_build.repository import sha256_of
from effnet_build.scaling import custom_variant

MANIFEST_KEYS = {
    "schema_version", "name", "family", "variant", "phi", "width_mult", "depth_mult", "resolution", "dropout",
    "preprocess", "params", "macs", "weights", "accuracy", "onnx", "labels", "build",
}


def run_session(onnx_path, batch):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": batch})[0]


def test_tiny_repository_is_complete(tiny_repo):
    manifest = json.loads((tiny_repo / "tiny" / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["preprocess"]["crop"] == 64 and manifest["preprocess"]["resize"] == 73
    assert manifest["weights"] == {"source": "random:seed=0", "sha256": None, "pretrained": False, "format": "random", "notes": []}
    assert manifest["padding"] == "symmetric"
    assert manifest["accuracy"] == {"reference": None, "measured": None}
    assert len(manifest["labels"]) == 1000 and manifest["labels"][281] == "tabby"
    assert manifest["onnx"]["sha256"] == sha256_of(tiny_repo / "tiny" / "model.onnx")
    assert manifest["onnx"]["opset"] >= 17
    assert {"max_abs_diff", "logit_scale", "bound"} <= set(manifest["onnx"]["parity"])  # the build's own check, recorded
    assert manifest["params"] > 0 and manifest["macs"] > 0


def test_the_written_onnx_file_computes_what_pytorch_computes_on_real_photos(tmp_path):
    """Not the build's parity number read back: the file in the repository, run by ORT on real photos
    through the served preprocessing, against the PyTorch network rebuilt from the same weights."""
    import torch
    from skimage import data

    from effnet_serve.engine.manifest import Preprocess
    from effnet_serve.engine.preprocess import prepare
    from effnet_build.weights import resolve

    variant = custom_variant("tiny", 0.25, 0.25, 64)
    built = pipeline.build_model(variant, tmp_path, "random")
    manifest = json.loads((built.path / "manifest.json").read_text())
    pp = Preprocess(**manifest["preprocess"])
    photos = [Image.fromarray(p()) for p in (data.chelsea, data.coffee, data.astronaut, data.rocket)]
    x = np.stack([prepare(_png(im), pp, 50_000_000).tensor for im in photos])
    onnx_logits = run_session(built.path / "model.onnx", x)
    network = pipeline.network_for(variant, resolve(variant, "random"), pp.crop)
    with torch.no_grad():
        torch_logits = network(torch.from_numpy(x)).numpy()
    scale = float(np.abs(torch_logits).max())
    assert scale > 1e-2  # random weights, but not degenerate ones
    assert float(np.abs(onnx_logits - torch_logits).max()) <= 1e-4 * max(1.0, scale)
    assert len({int(i) for i in torch_logits.argmax(axis=1)}) > 1  # the photos are told apart


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_rebuild_is_skipped_unless_forced(tiny_repo, copy_repo):
    repo = copy_repo(tiny_repo, "tiny")  # built by the fixture with exactly these inputs
    args = [sys.executable, "-m", "effnet_serve", "build", "--width", "0.25", "--depth", "0.25", "--resolution", "64",
            "--name", "tiny", "--weights", "random", "--quiet", "--repo", str(repo)]
    first = (repo / "tiny" / "model.onnx").stat().st_mtime_ns
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    assert "up to date" in out and (repo / "tiny" / "model.onnx").stat().st_mtime_ns == first
    out = subprocess.run(args + ["--force"], check=True, capture_output=True, text=True).stdout
    assert "up to date" not in out and (repo / "tiny" / "model.onnx").stat().st_mtime_ns != first


def test_a_crashed_build_leaves_no_half_model_and_keeps_the_old_one(tmp_path, monkeypatch, tiny_repo):
    repo = tmp_path / "repo"
    variant = custom_variant("tiny", 0.25, 0.25, 64)

    def crash_mid_write(model, crop, path):
        path.write_bytes(b"half an onnx file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "export_onnx", crash_mid_write)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.build_model(variant, repo, "random")
    assert list(repo.iterdir()) == []  # no model folder, no staging folder

    import shutil

    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    before = (repo / "tiny" / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.build_model(variant, repo, "random", force=True)
    assert (repo / "tiny" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]


def test_cli_failure_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "effnet_serve", "build", "--models", "b9", "--repo", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "unknown variant 'b9'" in proc.stderr


def test_b0_random_build_has_the_contracted_signature(b0_repo):
    repo = b0_repo  # built by `effnet build --models b0 --weights random` (tests/conftest.py)
    model = onnx.load(str(repo / "b0" / "model.onnx"))
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    (inp,), (out,) = model.graph.input, model.graph.output
    assert isinstance(dims(inp)[0], str) and dims(inp)[1:] == [3, 224, 224]
    assert isinstance(dims(out)[0], str) and dims(out)[1:] == [1000]

    batch = np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32)
    together = run_session(repo / "b0" / "model.onnx", batch)
    apart = np.concatenate([run_session(repo / "b0" / "model.onnx", batch[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, apart, atol=1e-5)
    assert np.abs(together).max() > 1e-2  # random weights are not degenerate

    manifest = json.loads((repo / "b0" / "manifest.json").read_text())
    assert manifest["params"] == 5_288_548
    assert manifest["preprocess"] == {"resize": 256, "crop": 224, "interpolation": "bicubic",
                                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
