"""Helpers shared by the serving tests: fake ONNX models, a live uvicorn server, images.

The fake models are real ONNX graphs run by a real ORT session (GlobalAveragePool ->
Flatten -> MatMul -> Add), with manifests written to docs/manifest.md, so the whole app
path is exercised in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
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

from effnet_serve.core.config import Settings
from effnet_serve.api.server import create_app

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


def link_repo(dest: Path, *folders: Path) -> Path:
    """A repository whose model folders are symlinks to already-built ones."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in folders:
        link = dest / f.name
        if link.is_symlink() or link.exists():
            if link.resolve() == f.resolve():
                continue
            link.unlink()
        link.symlink_to(f.resolve(), target_is_directory=True)
    return dest


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


# EFFNET_TEST_WORKERS=N (N > 1) runs every live server of the suite as the service runs with EFFNET_WORKERS=N:
# N front-end apps on one shared port (SO_REUSEPORT), each over the engine through the link and shared
# memory, the engine's data plane on a loop of its own. All in this process, so that the white-box tests
# can still reach the engine's registry and batchers; tests/serving/test_serve_workers_processes.py covers
# the real processes (spawn, signals, deaths).
TEST_WORKERS = int(os.environ.get("EFFNET_TEST_WORKERS", "1"))
_ARENA_IDS = itertools.count(1)  # arena names: the test process's pid and this


class EngineThread:
    """The engine (app/engine/link/process.py's loop, without its signals) on a thread of its own."""

    def __init__(self, settings: Settings, socket_path: str) -> None:
        self.settings, self.socket_path = settings, socket_path
        self.plane = None
        self.server = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="engine", daemon=True)

    async def _main(self) -> None:
        from effnet_serve.engine.link.server import EngineServer
        from effnet_serve.engine.runtime import running_plane

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running_plane(self.settings, decode_workers=1) as plane:
            self.plane, self.server = plane, EngineServer(plane, self.socket_path)
            await self.server.start()
            self._ready.set()
            await self._stop.wait()
            plane.draining = True
            self.server.push()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.drain_s + 5.0):
                    await self.server.idle.wait()
            await self.server.close()

    def start(self) -> None:
        self.thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the engine did not start")

    def call(self, fn) -> None:
        """Run fn() on the engine's loop and wait for it."""
        async def run():
            fn()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=60)


class ServiceView:
    """`srv.plane` of a service split in two layers: the engine's data plane (registry, batchers, stats,
    queue room), with what the workers hold themselves: uploads in progress and the memory budget (shared
    counts), and their decode pools."""

    def __init__(self, engine: EngineThread, workers: list) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_workers", workers)

    def _planes(self) -> list:
        return [w.state.plane for w in self._workers]

    def __getattr__(self, name: str):
        planes = self._planes()
        if name == "uploading":
            return planes[0].uploading  # every worker's, under the shared lock (memory.SharedUploadCount)
        if name == "memory":
            return BudgetView(planes)
        if name == "decode_pool":
            return EveryPool([p.decode_pool for p in planes])
        return getattr(self._engine.plane, name)

    def __setattr__(self, name: str, value) -> None:
        # Anything a test patches (a spy on `open`, say) is the engine's: the workers' calls end there.
        self._engine.call(lambda: setattr(self._engine.plane, name, value))
        if name == "draining":
            # SIGTERM reaches every process at once: the engine refuses new work and each worker drains;
            # and each worker has the engine's word (a real drain never ends; a test's does).
            for p in self._planes():
                p.draining = value
            self._engine.call(self._engine.server.push)
            deadline = time.monotonic() + 10
            while any(p.readiness().draining != value for p in self._planes()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not see the engine's drain change")
                time.sleep(0.01)

    def __delattr__(self, name: str) -> None:
        self._engine.call(lambda: delattr(self._engine.plane, name))


class EveryPool:
    """The workers' decode pools as one: a job submitted runs on each (a test holding "the" decode thread
    holds every worker's, wherever the kernel sends its connection)."""

    def __init__(self, pools: list) -> None:
        self.pools = pools

    def submit(self, fn, *args, **kwargs):
        return [pool.submit(fn, *args, **kwargs) for pool in self.pools][0]


class BudgetView:
    """The in-flight memory budget the workers share (memory.SharedBudget): one number for the service."""

    def __init__(self, planes: list) -> None:
        self._budgets = [p.memory for p in planes]

    @property
    def used(self) -> int:
        return self._budgets[0].used  # every slot, under the shared lock

    @property
    def peak(self) -> int:
        return max(b.peak for b in self._budgets)

    def __getattr__(self, name: str):
        return getattr(self._budgets[0], name)


class WorkersLiveServer:
    """LiveServer's interface over a service split as EFFNET_WORKERS=N splits it (see TEST_WORKERS)."""

    def __init__(self, settings: Settings, workers: int = TEST_WORKERS, **app_options) -> None:
        import multiprocessing
        import tempfile

        from effnet_serve.api.server import reuseport_socket
        from effnet_serve.engine.link import shm
        from effnet_serve.engine.memory import SharedBudget, SharedUploadCount, SlotTable

        self.rundir = tempfile.mkdtemp(prefix="effnet-test-")
        self.engine = EngineThread(settings, os.path.join(self.rundir, "engine.sock"))
        spawn = multiprocessing.get_context("spawn")
        slots = SlotTable(spawn, workers, os.path.join(self.rundir, "budget.lock"))
        upload_slots = SlotTable(spawn, workers, os.path.join(self.rundir, "uploads.lock"))
        self.arenas, self.apps, self.servers, self.socks, self.threads = [], [], [], [], []
        for i in range(workers):
            sock = reuseport_socket("127.0.0.1", self.socks[0].getsockname()[1] if self.socks else 0)
            sock.listen(2048)
            arena = shm.Arena(shm.segment_name(f"test{os.getpid()}", next(_ARENA_IDS)), settings.shm_mb << 20)
            app = create_app(settings, **app_options)
            app.state.host = "127.0.0.1"
            app.state.engine_link = (self.engine.socket_path, arena, workers,
                                     SharedBudget(settings.max_inflight_bytes, slots, i),
                                     SharedUploadCount(settings.max_uploads, upload_slots, i))
            config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
            server = uvicorn.Server(config)
            self.arenas.append(arena)
            self.apps.append(app)
            self.servers.append(server)
            self.socks.append(sock)
            self.threads.append(threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True))
        self.app = self.apps[0]
        self.port = self.socks[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.plane = ServiceView(self.engine, self.apps)

    def start(self, wait_ready: bool = True, timeout: float = 60) -> "WorkersLiveServer":
        self.engine.start()
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + timeout
        while not all(s.started for s in self.servers):
            if time.monotonic() > deadline or not all(t.is_alive() for t in self.threads):
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        # Loaded in the engine, and every worker told so (the engine pushes its state every 50 ms).
        while wait_ready and not (self.engine.plane.registry.loaded and self._workers_current()):
            if time.monotonic() > deadline:
                raise RuntimeError("models did not load")
            time.sleep(0.02)
        return self

    def _workers_current(self) -> bool:
        want = self.engine.plane.readiness()
        return all(getattr(app.state, "plane", None) is not None and app.state.plane.readiness() == want
                   for app in self.apps)

    def stop(self) -> None:
        for s in self.servers:
            s.should_exit = True
        for t in self.threads:
            t.join(timeout=30)
        self.engine.stop()
        for sock in self.socks:
            sock.close()
        for arena in self.arenas:
            arena.close()
        shutil.rmtree(self.rundir, ignore_errors=True)


def make_live_server(settings: Settings, **app_options):
    """A LiveServer, or its split twin when the suite runs with EFFNET_TEST_WORKERS > 1."""
    if TEST_WORKERS > 1:
        return WorkersLiveServer(settings, **app_options)
    return LiveServer(settings, **app_options)


@contextlib.contextmanager
def live_server(settings: Settings, **app_options) -> Iterator[LiveServer]:
    srv = make_live_server(settings, **app_options).start()
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


async def settle(check, timeout_s: float = 10.0) -> None:
    """Wait until check() holds, for what happens a moment after the call that caused it (a message without
    an answer, a state push): polled every 10 ms, failed after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, "did not happen"
        await asyncio.sleep(0.01)


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
