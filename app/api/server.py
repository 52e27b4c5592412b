"""`effnet serve`: uvicorn around the app (app/api/app.py), a malloc tuned for big image buffers, and a
shutdown that turns readiness to 503 the moment SIGTERM arrives and exits 0 after the drain."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .http_protocol import bounded_http
from ..core.config import Settings
from ..core.log_limits import limit_client_triggered_logs
from ..core.malloc import tune_malloc

log = logging.getLogger("effnet.server")

LINGER_S = 0.25  # after SIGTERM, new connections are still accepted (and refused with 503) this long


def serve(host: str, port: int) -> int:
    """The service in one process (EFFNET_WORKERS=1)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()
    settings = Settings()
    app = create_app(settings)
    app.state.host = host  # the gRPC front end listens on the same interface
    server = DrainingServer(_config(app, settings, host, port), app)
    _quiet_signals()
    server.run()
    return 0 if server.started else 1


def serve_worker(host: str, port: int, socket_path: str, arena_name: str, arena_bytes: int, workers: int,
                 budget_slots, upload_slots, index: int) -> None:
    """Front-end worker `index` (app/supervisor.py): HTTP and gRPC on ports shared with the other workers
    (each its own SO_REUSEPORT socket), over the engine process at `socket_path`; `budget_slots` holds the
    workers' shares of the in-flight memory budget, `upload_slots` their uploads in progress."""
    from ..engine.link.shm import Arena
    from ..engine.memory import SharedBudget, SharedUploadCount

    # The supervisor may stop the service while this worker is still starting: a SIGTERM that arrives
    # before uvicorn listens for it must still stop it (uvicorn then exits right after its startup).
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: early.append(s))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    tune_malloc()
    settings = Settings()
    arena = Arena(arena_name, arena_bytes)
    try:
        app = create_app(settings)
        app.state.host = host
        budget = SharedBudget(settings.max_inflight_bytes, budget_slots, index)
        uploads = SharedUploadCount(settings.max_uploads, upload_slots, index)
        server = DrainingServer(_config(app, settings, host, port), app)
        # A link to the engine lost while the engine lives (it ended the link) would leave this worker answering
        # 503 for good beside healthy ones: it stops (exit 0), and the supervisor starts another.
        app.state.engine_link = (socket_path, arena, workers, budget, uploads,
                                 lambda: server.handle_exit(signal.SIGTERM, None))
        # Until uvicorn installs its own handlers, and again once it restores these and re-raises what it
        # caught: a signal means "drain and stop", never "die" (exit 0 after the drain).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, server.handle_exit)
        if early:
            server.handle_exit(early[0], None)
        server.run(sockets=[shared_socket(host, port)])
    finally:
        arena.close()


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to a port that other processes may bind too (SO_REUSEPORT: the kernel spreads new
    connections over the listening ones by hash, rather than waking every process for each one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def shared_socket(host: str, port: int) -> socket.socket:
    """A worker's own listening socket on the service's shared port."""
    sock = reuseport_socket(host, port)
    sock.listen(2048)
    return sock


def _config(app: FastAPI, settings: Settings, host: str, port: int) -> uvicorn.Config:
    tls: dict[str, Any] = {}
    if settings.tls_cert is not None and settings.tls_key is not None:  # HTTPS (gRPC uses the same files)
        tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    config = uvicorn.Config(
        app, host=host, port=port, workers=1, timeout_graceful_shutdown=math.ceil(settings.drain_s),
        log_level="info", access_log=False, lifespan="on",
        # Requests in progress: beyond this, new requests get uvicorn's 503 at once. Connections between
        # requests (opening, idle, sending headers) are bounded apart (app/api/http_protocol.py).
        limit_concurrency=settings.max_connections,
        http=bounded_http(settings.max_header_bytes, settings.header_timeout_s, settings.max_connections),
        timeout_keep_alive=settings.keepalive_s,  # type: ignore[arg-type]  # uvicorn's call_later takes a float
        **tls,
    )
    limit_client_triggered_logs()  # after uvicorn.Config, which configures uvicorn's loggers
    return config


def _quiet_signals() -> None:
    # uvicorn re-raises the signal it caught once it has shut down (so the process dies
    # "by SIGTERM", exit 143); a no-op handler underneath turns that into a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that flips readiness to 503 the moment shutdown begins."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        plane = getattr(self.app.state, "plane", None)
        if plane is not None:
            plane.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Go on accepting for a moment, answering 503 shutting_down (draining is set), before the listening
        socket closes: connections already in the kernel's accept queue when it closes are reset, which a
        client cannot tell from a failure mid-request. With several workers the supervisor's signal reaches
        them a little after clients were told to go away, so some connections are always in flight."""
        await asyncio.sleep(LINGER_S)
        waiting = getattr(self.config.http, "waiting", None)
        if waiting is not None:  # connections between requests, uncounted till now: closed with the idle ones
            waiting.hand_over(self.server_state.connections)
        await super().shutdown(sockets)
