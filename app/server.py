"""The FastAPI app factory and `effnet serve`.

Lifecycle: startup returns at once and loads models in the background (so liveness answers
while a B7 loads; readiness waits for every model to be loaded and warmed). On SIGTERM
uvicorn stops accepting, readiness turns 503, in-flight and queued requests get up to
EFFNET_DRAIN_S to finish, then the batchers stop and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.config import Settings
from app.errors import install_handlers
from app.family import FamilyState
from app.metrics import Metrics
from app.oip import router as oip_router
from app.preprocess import set_max_pixels
from app.registry import Registry
from app.routes import State, router
from app.routing import LatencyRecorder
from app.security import ApiKeyMiddleware

log = logging.getLogger("effnet.server")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_max_pixels(settings.max_image_pixels)
        registry = Registry(settings, hooks_for=metrics.hooks)
        registry.on_ready = lambda e: metrics.model_loaded(e.name, e.manifest, e.provider or "")
        pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")
        app.state.effnet = State(settings, registry, metrics, pool)
        loader = asyncio.create_task(registry.load_all(), name="load-models")
        try:
            yield
        finally:
            app.state.effnet.draining = True
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            # uvicorn already waited (up to DRAIN_S) for in-flight requests; whatever is
            # still queued gets a short last chance, then fails with a 503.
            await registry.close(drain_s=min(settings.drain_s, 5.0))
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="EfficientNet serving",
        version=__version__,
        description="Classify images with the EfficientNet family (B0-B7, Lite0-4, custom variants) on ONNX Runtime.",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.include_router(router)
    app.include_router(oip_router)  # Open Inference Protocol (KServe V2)
    app.state.family = FamilyState()  # model=auto latency statistics
    app.add_middleware(LatencyRecorder)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"],
        )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value(), exempt=settings.api_key_exempt)
    return app


def tune_malloc() -> None:
    """Keep glibc from handing big freed blocks back to the OS after every request.

    Measured here: with the defaults, each full-size JPEG decode gets fresh mmap'd pages and
    pays the page faults again (12.9 ms vs 6.2 ms). Same effect as MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ in the environment, but it needs no re-exec. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
        libc.mallopt(m_trim_threshold, 64 * 1024 * 1024)
        # One malloc arena per thread (a decode pool plus an inference thread per model)
        # would each keep up to the trim threshold of freed memory; a few shared arenas do not.
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass


def serve(host: str, port: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()
    settings = Settings()
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, workers=1, timeout_graceful_shutdown=settings.drain_s,
        log_level="info", access_log=False, lifespan="on",
    )
    server = DrainingServer(config, app)
    # uvicorn re-raises the signal it caught once it has shut down (so the process dies
    # "by SIGTERM", exit 143); a no-op handler underneath turns that into a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that flips readiness to 503 the moment shutdown begins."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = getattr(self.app.state, "effnet", None)
        if state is not None:
            state.draining = True
        super().handle_exit(sig, frame)
