"""The engine process: the data plane (models, batchers, queue room, model control, metrics) served to the
worker processes over a Unix socket (server.py). Started by the supervisor (app/supervisor.py) with the
`spawn` method, so ONNX Runtime (and CUDA) start fresh in it and never cross a fork.

SIGTERM: new work is refused at once (draining, pushed to every worker), what the workers still hold is
served until they have all gone (they drain for up to EFFNET_DRAIN_S), then the models stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from multiprocessing.connection import Connection

from ...core.config import Settings
from ...core.collector import settle
from ...core.malloc import tune_malloc
from .server import EngineServer
from ..runtime import running_plane

log = logging.getLogger("effnet.engine")


def run_engine(socket_path: str, ready: Connection) -> None:
    """The engine process's main function."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    tune_malloc()  # ORT's buffers outside its arena, and the batches the batcher stacks
    settings = Settings()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    asyncio.run(_serve(settings, socket_path, ready))


async def _serve(settings: Settings, socket_path: str, ready: Connection) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_plane(settings, decode_workers=1) as plane:
        server = EngineServer(plane, socket_path)
        await server.start()
        settle()  # startup's objects out of every later garbage collection (app/core/collector.py)
        ready.send("ready")
        ready.close()
        await stop.wait()
        log.info("stopping: refusing new work, serving what the workers hold")
        plane.draining = True
        server.push()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.drain_s + 5.0):
                await server.idle.wait()
        await server.close()
