"""The data plane's lifetime in one process: built, models loading in the background, repository watched;
then drained and stopped. The single-process service (app/api/app.py) and the engine process
(app/engine/link/main.py) both run it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from ..core.config import Settings
from .dataplane import DataPlane
from .metrics import Metrics
from .preprocess import set_max_pixels
from .registry import Registry


@contextlib.asynccontextmanager
async def running_plane(settings: Settings, decode_workers: int | None = None) -> AsyncIterator[DataPlane]:
    """Returns at once: models load in the background (liveness answers while a B7 loads). On the way out
    the plane refuses new work, whatever is still queued gets a short last chance, and the batchers stop."""
    set_max_pixels(settings.max_image_pixels)
    metrics = Metrics()
    registry = Registry(settings, observer=metrics)
    pool = ThreadPoolExecutor(max_workers=decode_workers or settings.decode_workers, thread_name_prefix="decode")
    plane = DataPlane(settings, registry, metrics, pool)
    loader = asyncio.create_task(registry.load_all(), name="load-models")
    plane.control.start()  # EFFNET_MODEL_CONTROL=poll: watch the repository
    try:
        yield plane
    finally:
        plane.draining = True
        await plane.control.stop()
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        # The front ends already waited (up to DRAIN_S) for requests in flight; whatever is still queued
        # gets a short last chance, then fails with a 503.
        await registry.close(drain_s=min(settings.drain_s, 5.0))
        pool.shutdown(wait=False, cancel_futures=True)
