"""Every checkpoint computes what its own library computes.

The expected logits were recorded from the reference implementations themselves, in a side venv
(tests/data/generate_reference_logits.py): `efficientnet-lite-pytorch` with the real Lite weights on real
photos, and `efficientnet_pytorch` B0/B3 with seeded, BatchNorm-calibrated random weights. Bound: the
largest difference is within 1e-4 of the reference's largest logit, and top-5 is identical.
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from effnet_build.efficientnet import EfficientNet
from effnet_build.pipeline import network_for
from effnet_build.scaling import named_variant
from effnet_build.weights import from_checkpoint, lite_package_checkpoint, resolve, sha256_file

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA))
import seeded_weights  # noqa: E402

REF_LITE = np.load(DATA / "reference_lite.npz")
REF_B = np.load(DATA / "reference_efficientnet_pytorch.npz")
SEED = int(REF_B["seed"])
BOUND = 1e-4


def lite_inputs(name: str) -> np.ndarray:
    """The reference's exact input: the recorded uint8 crops, scaled to [-1, 1], NCHW."""
    u8 = REF_LITE[f"{name}_inputs"]
    return ((u8.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def top5(logits: np.ndarray) -> list[list[int]]:
    return [list(np.argsort(-row, kind="stable")[:5]) for row in logits]


def relative_gap(logits: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(logits - ref).max() / np.abs(ref).max())


def assert_matches(logits: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(ref).max() > 0.5  # the fixture is not degenerate
    assert relative_gap(logits, ref) <= BOUND
    assert top5(logits) == top5(ref)


def onnx_logits(model_dir: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": x})[0]


@pytest.fixture(scope="module")
def lite_repos(lite0_repo, lite1_repo, lite2_repo) -> dict[str, Path]:
    return {"lite0": lite0_repo, "lite1": lite1_repo, "lite2": lite2_repo}


# --- EfficientNet-Lite: the real weights, on real photos ----------------------------------------------
@pytest.mark.parametrize("name", ["lite0", "lite1", "lite2"])
def test_lite_onnx_computes_what_efficientnet_lite_pytorch_computes(lite_repos, name):
    folder = lite_repos[name] / name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["padding"] == "same" and manifest["weights"]["format"] == "efficientnet_lite"
    assert manifest["bn_eps"] == 1e-3 and manifest["weights"]["pretrained"] is True
    assert_matches(onnx_logits(folder, lite_inputs(name)), REF_LITE[f"{name}_logits"])


def test_symmetric_padding_would_miss_the_lite_reference():
    """The control: the same weights with torchvision-style padding are measurably wrong, so the test above can fail."""
    variant = named_variant("lite0")
    weights = resolve(variant, "pretrained")
    model = EfficientNet(variant, padding="symmetric")
    model.load_state_dict(weights.state_dict)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(lite_inputs("lite0"))).numpy()
    assert relative_gap(logits, REF_LITE["lite0_logits"]) > 100 * BOUND
    assert top5(logits) != top5(REF_LITE["lite0_logits"])


def test_same_padding_exports_as_asymmetric_conv_pads_without_pad_nodes(lite_repos):
    """ONNX Conv takes begin and end pads per axis: the exported graph needs no separate Pad."""
    graph = onnx.load(str(lite_repos["lite0"] / "lite0" / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Pad"]
    pads = [list(a.ints) for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    assert [0, 0, 1, 1] in pads  # the stem: 3x3, stride 2, 224 px -> 0 before, 1 after
    assert [1, 1, 2, 2] in pads  # a 5x5 stride-2 depthwise convolution on an even input


# --- efficientnet_pytorch (lukemelas) B-checkpoints --------------------------------------------------
def lukemelas_checkpoint(name: str, path: Path) -> Path:
    """The reference's seeded state dict, rebuilt: seeded tensors regenerated, BN statistics from the fixture."""
    layouts = json.loads(gzip.open(DATA / "lukemelas_keys.json.gz", "rt").read())["models"]
    digests = json.loads(str(REF_B[f"{name}|digests"]))
    state = {}
    for key, shape in layouts[name].items():
        value = seeded_weights.tensor_for(SEED, key, tuple(shape))
        if value is not None:
            assert seeded_weights.digest(value) == digests[key], f"{key} did not regenerate bit for bit"
        elif key.endswith("num_batches_tracked"):
            value = np.array(3, dtype=np.int64)
        else:
            value = REF_B[f"{name}|{key}"]
        state[key] = torch.from_numpy(np.asarray(value))
    assert len(digests) == sum(1 for k in state if k in digests)
    torch.save(state, path)
    return path


def test_b0_efficientnet_pytorch_checkpoint_builds_an_onnx_that_matches_the_library(tmp_path, effnet_build):
    checkpoint = lukemelas_checkpoint("b0", tmp_path / "my-efficientnet-b0.pth")
    repo = tmp_path / "repo"
    effnet_build(repo, "--models", "b0", "--weights", str(checkpoint))
    manifest = json.loads((repo / "b0" / "manifest.json").read_text())
    assert manifest["weights"]["format"] == "efficientnet_pytorch" and manifest["padding"] == "same"
    assert manifest["bn_eps"] == 1e-3
    assert manifest["weights"]["pretrained"] is False  # a user's own file is not claimed to be ImageNet-trained
    x = seeded_weights.seeded_input(SEED, (2, 3, 224, 224))
    assert_matches(onnx_logits(repo / "b0", x), REF_B["b0|logits"])


def test_b3_efficientnet_pytorch_checkpoint_matches_the_library_in_pytorch(tmp_path):
    """B3 (300 px, odd sizes deeper in the network) through the build's own network construction, no export."""
    variant = named_variant("b3")
    weights = resolve(variant, str(lukemelas_checkpoint("b3", tmp_path / "b3.pth")))
    model = network_for(variant, weights, crop=300)
    assert model.variant.bn_eps == 1e-3 and model.padding == "same"
    with torch.no_grad():
        logits = model(torch.from_numpy(seeded_weights.seeded_input(SEED, (2, 3, 300, 300)))).numpy()
    assert_matches(logits, REF_B["b3|logits"])
    # The control: torchvision-style padding and eps give something else.
    wrong = EfficientNet(variant)
    wrong.load_state_dict(weights.state_dict)
    with torch.no_grad():
        wrong_logits = wrong.eval()(torch.from_numpy(seeded_weights.seeded_input(SEED, (2, 3, 300, 300)))).numpy()
    assert relative_gap(wrong_logits, REF_B["b3|logits"]) > 100 * BOUND


@pytest.mark.parametrize("name", [f"b{i}" for i in range(9)] + [f"lite{i}" for i in range(5)])
def test_every_layout_the_reference_libraries_define_loads_strictly(tmp_path, name):
    """Key names and shapes of efficientnet_pytorch b0..b8 and efficientnet-lite lite0..lite4 (recorded from the
    libraries) fit the network we build for the same name."""
    layouts = json.loads(gzip.open(DATA / "lukemelas_keys.json.gz", "rt").read())["models"]
    state = {k: torch.zeros(shape) for k, shape in layouts[name].items()}
    fmt, ours = from_checkpoint(state, named_variant(name), "fixture")
    assert fmt.name == ("efficientnet_lite" if name.startswith("lite") else "efficientnet_pytorch")
    with torch.device("meta"):
        model = EfficientNet(replace(named_variant(name), bn_eps=1e-3), padding=fmt.padding)
    model.load_state_dict(ours, strict=True, assign=True)


@pytest.mark.parametrize("name", ["lite0", "lite1", "lite2"])
def test_the_lite_weights_installed_here_are_the_ones_the_fixture_was_recorded_with(name):
    """The Lite logits above check our network only if both sides loaded the same file."""
    assert sha256_file(lite_package_checkpoint(name)) == str(REF_LITE[f"{name}_weights_sha256"])
