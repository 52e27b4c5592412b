"""Helpers shared by the serving tests: fake ONNX models, a live uvicorn server, images.

The fake models are real ONNX graphs run by a real ORT session (GlobalAveragePool ->
Flatten -> MatMul -> Add), with manifests written to docs/manifest.md, so the whole app
path is exercised in milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import uvicorn
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from app.core.config import Settings
from app.api.server import create_app

LABELS = [f"class {i}" for i in range(1000)]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def fake_onnx(crop: int, seed: int = 0) -> bytes:
    """[batch, 3, crop, crop] -> mean colour -> linear -> [batch, 1000] logits."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((3, 1000)) * 3).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(1000, dtype=np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "B"], ["logits"]),
        ],
        "fake",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_for(name: str, onnx_bytes: bytes, crop: int, resize: int, pretrained: bool = False) -> dict:
    return {
        "schema_version": 1,
        "name": name,
        "family": "efficientnet",
        "variant": "custom",
        "phi": None,
        "width_mult": 0.25,
        "depth_mult": 0.25,
        "resolution": crop,
        "dropout": 0.2,
        "preprocess": {"resize": resize, "crop": crop, "interpolation": "bicubic", "mean": MEAN, "std": STD},
        "params": 4000,
        "macs": 3000,
        "weights": {"source": "random:seed=0", "sha256": None, "pretrained": pretrained},
        "accuracy": {"reference": {"top1": 77.1, "top5": 93.3, "dataset": "ImageNet-1k val", "source": "test"}, "measured": None},
        "onnx": {
            "file": "model.onnx",
            "opset": 17,
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "input": {"name": "images", "shape": ["batch", 3, crop, crop], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", 1000], "dtype": "float32"},
            "parity": None,
        },
        "labels": LABELS,
        "build": {"tool_version": "test"},
    }


def write_model(repo: Path, name: str, crop: int = 32, resize: int = 36, seed: int = 0, changes: dict | None = None) -> Path:
    data = fake_onnx(crop, seed)
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(data)
    manifest = manifest_for(name, data, crop, resize)
    manifest.update(changes or {})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


GOOD = ["fake", "fake2"]


# --- live server ------------------------------------------------------------------------
class LiveServer:
    def __init__(self, settings: Settings, **app_options) -> None:
        self.app = create_app(settings, **app_options)  # app_options: create_app's keywords (tracer_provider)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def plane(self):
        return self.app.state.plane

    def start(self, wait_ready: bool = True, timeout: float = 60) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        while wait_ready and not self.plane.registry.loaded:
            if time.monotonic() > deadline:
                raise RuntimeError("models did not load")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@contextlib.contextmanager
def live_server(settings: Settings, **app_options) -> Iterator[LiveServer]:
    srv = LiveServer(settings, **app_options).start()
    try:
        yield srv
    finally:
        srv.stop()


# --- images -----------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus a little noise)."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), (x + y) / max(w + h - 2, 1)], axis=-1) * 200
    a += rng.normal(0, 8, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")



@contextlib.contextmanager
def queue_held(srv: LiveServer, model: str, images: int) -> Iterator[None]:
    """Hold `images` slots of a model's queue from the server's own loop, as requests still decoding would:
    a real full queue, without racing real requests to fill it."""
    import asyncio

    batcher = srv.plane.registry.entries[model].batcher
    loop = batcher._task.get_loop()

    async def reserve():
        return batcher.reserve(images)

    room = asyncio.run_coroutine_threadsafe(reserve(), loop).result(5)
    try:
        yield
    finally:
        async def release():
            room.release()

        asyncio.run_coroutine_threadsafe(release(), loop).result(5)
