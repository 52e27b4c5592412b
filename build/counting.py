"""Parameters and multiply-adds of a built network, measured on its modules.

The paper's "FLOPs" are multiply-adds of the convolutions and the classifier, at the input resolution.
`build.scaling.count_params_macs` computes the same from the layout alone (for `effnet variants`);
tests hold the two to exact agreement.
"""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-adds for one image: each conv costs out_elements * (in_channels / groups) * kh * kw."""
    total = 0

    def on_conv(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def on_linear(module: nn.Linear, _inputs, _output) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(on_linear))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, resolution, resolution, device=device))
    finally:
        for h in hooks:
            h.remove()
    return total
