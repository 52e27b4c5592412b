"""The EfficientNet network in PyTorch, built from a `Variant`.

Module names mirror torchvision's `efficientnet_bN` exactly (`features.{stage}.{i}.block.{k}...`,
`classifier.1`), so torchvision checkpoints load with strict=True and compute what torchvision computes.

Padding is a property of the weights, not of the architecture:

* `symmetric`: every k x k convolution pads (k - 1) // 2 on each side (torchvision, and our random weights).
* `same`: TensorFlow's padding="SAME", which the TF-trained checkpoints (efficientnet_pytorch's B0..B8 and the
  Lite releases) were trained with. A stride-2 convolution on an even input pads less before than after
  (k=3: 0 and 1; k=5: 1 and 2), so the sampling grid is shifted by one pixel against `symmetric`. The pads
  depend on the input size, so they are computed once for the resolution the graph is exported at, as the
  reference implementations do; the exported ONNX graph is static at that resolution anyway.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .scaling import BlockSpec, Variant

ACTIVATIONS = {"silu": nn.SiLU, "relu6": nn.ReLU6}
Padding = Literal["symmetric", "same"]
PADDINGS: tuple[Padding, ...] = ("symmetric", "same")


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" along one axis: output ceil(size / stride), padding (before, after), after >= before."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StaticPadConv2d(nn.Conv2d):
    """A convolution with fixed, possibly asymmetric zero padding (left, right, top, bottom) in front.

    Still an nn.Conv2d, so parameter names and the MAC counter see an ordinary convolution. ONNX Runtime
    folds the exported Pad into the Conv's own `pads` at load (tests/build_step check that it does).
    """

    def __init__(self, *args, pads: tuple[int, int, int, int], **kwargs) -> None:
        super().__init__(*args, padding=0, **kwargs)
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, in_size: int, padding: Padding) -> nn.Conv2d:
    if padding == "symmetric":
        return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False)
    before, after = same_pads(in_size, kernel, stride)
    if before == after:
        return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=before, groups=groups, bias=False)
    return StaticPadConv2d(in_ch, out_ch, kernel, stride, groups=groups, bias=False, pads=(before, after, before, after))


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> optional activation; a Sequential so that children are named 0, 1, 2."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        bn_eps: float = 1e-5,
        activation: type[nn.Module] | None = nn.SiLU,
        in_size: int = 0,
        padding: Padding = "symmetric",
    ) -> None:
        layers: list[nn.Module] = [
            conv2d(in_ch, out_ch, kernel, stride, groups, in_size, padding),
            nn.BatchNorm2d(out_ch, eps=bn_eps),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeezed: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = activation(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> [squeeze-excitation] -> 1x1 project, + skip."""

    def __init__(
        self, spec: BlockSpec, bn_eps: float, activation: type[nn.Module], in_size: int = 0, padding: Padding = "symmetric",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if spec.expanded_channels != spec.in_channels:
            layers.append(ConvBNAct(spec.in_channels, spec.expanded_channels, 1, bn_eps=bn_eps, activation=activation))
        layers.append(
            ConvBNAct(
                spec.expanded_channels,
                spec.expanded_channels,
                spec.kernel,
                spec.stride,
                groups=spec.expanded_channels,
                bn_eps=bn_eps,
                activation=activation,
                in_size=in_size,
                padding=padding,
            )
        )
        if spec.se_channels:
            layers.append(SqueezeExcitation(spec.expanded_channels, spec.se_channels, activation))
        layers.append(ConvBNAct(spec.expanded_channels, spec.out_channels, 1, bn_eps=bn_eps, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = spec.stride == 1 and spec.in_channels == spec.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Stochastic depth is a training-time regulariser; at inference it is the identity.
        out = self.block(x)
        return out + x if self.use_residual else out


class EfficientNet(nn.Module):
    def __init__(
        self,
        variant: Variant,
        num_classes: int = 1000,
        padding: Padding = "symmetric",
        input_size: int | None = None,
        bn_momentum: float = 0.1,
    ) -> None:
        """`input_size` (default: the variant's resolution) is the side the `same` pads are computed for;
        `bn_momentum` (torch convention) matters only to whoever fine-tunes the module."""
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
        self.variant = variant
        self.padding = padding
        act = ACTIVATIONS[variant.activation]
        eps = variant.bn_eps
        blocks = variant.blocks()
        size = input_size or variant.resolution

        features: list[nn.Module] = [
            ConvBNAct(3, variant.stem_channels, 3, 2, bn_eps=eps, activation=act, in_size=size, padding=padding)
        ]
        size = -(-size // 2)
        for stage in range(1, blocks[-1].stage + 1):
            stage_blocks = []
            for b in blocks:
                if b.stage == stage:
                    stage_blocks.append(MBConv(b, eps, act, in_size=size, padding=padding))
                    size = -(-size // b.stride)
            features.append(nn.Sequential(*stage_blocks))
        last_out = blocks[-1].out_channels
        features.append(ConvBNAct(last_out, variant.head_channels, 1, bn_eps=eps, activation=act))

        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=variant.dropout, inplace=True),
            nn.Linear(variant.head_channels, num_classes),
        )
        self.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum

    def reset_parameters(self) -> None:
        """torchvision's initialisation, so that an untrained model starts where torchvision's does."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)
