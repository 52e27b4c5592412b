"""Writes the torchvision reference fixtures that tests/build_step checks our EfficientNet against.

torchvision cannot be imported beside the pinned CPU torch, so this runs once, by hand, in a separate
venv that has torchvision (`pip install torch==2.14.1 torchvision==0.29.1`), and its output is committed:

    /path/to/tv-venv/bin/python tests/data/generate_torchvision_reference.py

- torchvision_keys.json: state-dict key -> shape for efficientnet_b0, b4, b7;
- torchvision_small.pt: a seeded small torchvision EfficientNet (width 0.25, depth 0.25, 10 classes) with
  non-trivial BatchNorm statistics, an input batch and torchvision's output for it.
"""

import json
from pathlib import Path

import torch
import torchvision
from torchvision.models import efficientnet as tv

HERE = Path(__file__).parent


def main() -> None:
    keys = {}
    for name in ("efficientnet_b0", "efficientnet_b4", "efficientnet_b7"):
        model = getattr(tv, name)(weights=None)
        keys[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    (HERE / "torchvision_keys.json").write_text(json.dumps({"torchvision": torchvision.__version__, "models": keys}))

    torch.manual_seed(0)
    setting, last_channel = tv._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    model = tv.EfficientNet(setting, dropout=0.2, last_channel=last_channel, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
        images = torch.randn(3, 3, 64, 64)
        logits = model(images)
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "images": images, "logits": logits, "torchvision": torchvision.__version__},
               HERE / "torchvision_small.pt")
    print("wrote", HERE / "torchvision_keys.json", HERE / "torchvision_small.pt", logits.abs().max().item())


if __name__ == "__main__":
    main()
