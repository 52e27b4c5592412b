"""Our EfficientNet against fixtures recorded from torchvision itself (tests/data/generate_torchvision_reference.py)."""

import json
from pathlib import Path

import pytest
import torch

from effnet_build.counting import count_macs, count_params
from effnet_build.efficientnet import EfficientNet
from effnet_build.scaling import count_params_macs, custom_variant, named_variant, phi_variant
from effnet_build.weights import resolve

DATA = Path(__file__).parent.parent / "data"
TORCHVISION_KEYS = json.loads((DATA / "torchvision_keys.json").read_text())["models"]


@pytest.mark.parametrize("name", ["b0", "b4", "b7"])
def test_state_dict_names_and_shapes_equal_torchvision(name):
    with torch.device("meta"):
        ours = EfficientNet(named_variant(name)).state_dict()
    expected = TORCHVISION_KEYS[f"efficientnet_{name}"]
    assert list(ours) == list(expected)
    assert {k: list(v.shape) for k, v in ours.items()} == expected


def test_computes_exactly_what_torchvision_computes():
    ref = torch.load(DATA / "torchvision_small.pt", weights_only=True)
    model = EfficientNet(custom_variant("small", 0.25, 0.25, 64), num_classes=10)
    model.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        logits = model.eval()(ref["images"])
    assert ref["logits"].abs().max() > 0.1  # the fixture is not degenerate
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-6)


def test_a_torchvision_format_b0_checkpoint_loads_strictly(tmp_path):
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=gen) if shape else torch.tensor(0)
             for k, shape in TORCHVISION_KEYS["efficientnet_b0"].items()}
    path = tmp_path / "efficientnet_b0_mine.pth"
    torch.save(state, path)

    weights = resolve(named_variant("b0"), str(path))
    model = EfficientNet(named_variant("b0"))
    model.load_state_dict(weights.state_dict, strict=True)
    assert torch.equal(model.classifier[1].weight, state["classifier.1.weight"])
    assert weights.pretrained is False  # a user's own file is not claimed to be ImageNet-trained
    assert len(weights.sha256) == 64


@pytest.mark.parametrize(
    "variant, resolution",
    [(named_variant("b0"), 224), (named_variant("lite2"), 260), (custom_variant("t", 0.25, 0.25, 64), 64),
     (phi_variant(-1.5), 301)],
    ids=["b0", "lite2", "tiny", "phi-1.5@301"],
)
def test_layout_count_equals_counting_the_real_modules(variant, resolution):
    """`effnet variants` counts from the layout; the build counts the modules it exports: they must agree."""
    model = EfficientNet(variant)
    assert count_params_macs(variant, resolution) == (count_params(model), count_macs(model, resolution))
