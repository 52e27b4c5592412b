"""The naive baseline: what a user writes by hand to serve EfficientNet over HTTP.

    python -m benchmarks.naive_server --repo .cache/bench-repo --model b0 --port 8001

One FastAPI endpoint, PyTorch eager, one request at a time: decode the whole JPEG with
Pillow, resize the full image (shorter side to `resize`, bicubic), centre-crop, ToTensor +
Normalize, `model(x)` at batch 1 under `torch.inference_mode()`, softmax, top-5 as JSON.
No batching, no draft decode, no thread tuning (PyTorch's defaults), and the blocking work
runs inside the `async def` handler, as in most tutorials. torchvision is not available, so
the network is the build step's `build.efficientnet.EfficientNet`, which computes what
torchvision's does (random weights: the speed is the same).

Kept under `benchmarks/`: it is the yardstick, not part of the product.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image

from effnet_build.efficientnet import EfficientNet
from effnet_build.scaling import KNOWN_VARIANTS, custom_variant, named_variant


def load_model(folder: Path) -> tuple[torch.nn.Module, dict, list[str]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    variant_name = manifest.get("variant")
    if variant_name in KNOWN_VARIANTS:
        variant = named_variant(variant_name)
    else:
        variant = custom_variant(manifest["name"], manifest["width_mult"], manifest["depth_mult"], manifest["resolution"],
                                 lite=manifest.get("family") == "efficientnet-lite")
    model = EfficientNet(variant, num_classes=len(manifest["labels"])).eval()
    return model, manifest["preprocess"], manifest["labels"]


def transform(img: Image.Image, pp: dict) -> torch.Tensor:
    """torchvision's Resize(resize) -> CenterCrop(crop) -> ToTensor -> Normalize, by hand."""
    w, h = img.size
    size = pp["resize"]
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    crop = pp["crop"]
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(pp["mean"]).view(3, 1, 1)
    std = torch.tensor(pp["std"]).view(3, 1, 1)
    return (x - mean) / std


def create_app(folder: Path) -> FastAPI:
    model, pp, labels = load_model(folder)
    app = FastAPI(title="naive EfficientNet server")

    @app.get("/health/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/classify")
    async def classify(request: Request, top_k: int = 5) -> dict:
        data = await request.body()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        x = transform(img, pp).unsqueeze(0)
        with torch.inference_mode():
            probs = model(x).softmax(dim=1)[0]
        scores, idx = probs.topk(top_k)
        return {"predictions": [{"index": int(i), "label": labels[int(i)], "score": float(s)} for s, i in zip(scores, idx, strict=True)]}

    # Warm-up: the first call pays for lazy initialisation.
    with torch.inference_mode():
        model(torch.zeros(1, 3, pp["crop"], pp["crop"]))
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_server")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = PyTorch's default (what a user gets)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    uvicorn.run(create_app(args.repo / args.model), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
