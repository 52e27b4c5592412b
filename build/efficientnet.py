"""The EfficientNet network in PyTorch, built from a `Variant`.

Module names mirror torchvision's `efficientnet_bN` exactly (`features.{stage}.{i}.block.{k}...`,
`classifier.1`), so torchvision checkpoints load with strict=True and compute what torchvision computes.
"""

from __future__ import annotations

import torch
from torch import nn

from build.scaling import BlockSpec, Variant

ACTIVATIONS = {"silu": nn.SiLU, "relu6": nn.ReLU6}


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
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
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

    def __init__(self, spec: BlockSpec, bn_eps: float, activation: type[nn.Module]) -> None:
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
    def __init__(self, variant: Variant, num_classes: int = 1000) -> None:
        super().__init__()
        self.variant = variant
        act = ACTIVATIONS[variant.activation]
        eps = variant.bn_eps
        blocks = variant.blocks()

        features: list[nn.Module] = [ConvBNAct(3, variant.stem_channels, 3, 2, bn_eps=eps, activation=act)]
        for stage in range(1, blocks[-1].stage + 1):
            features.append(nn.Sequential(*(MBConv(b, eps, act) for b in blocks if b.stage == stage)))
        last_out = blocks[-1].out_channels
        features.append(ConvBNAct(last_out, variant.head_channels, 1, bn_eps=eps, activation=act))

        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=variant.dropout, inplace=True),
            nn.Linear(variant.head_channels, num_classes),
        )
        self.reset_parameters()

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
