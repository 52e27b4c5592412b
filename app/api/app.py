"""The FastAPI app factory.

Lifecycle: startup returns at once and loads models in the background (so liveness answers while a B7
loads; readiness waits for every model to be loaded and warmed). On SIGTERM uvicorn stops accepting,
readiness turns 503, in-flight and queued requests get up to EFFNET_DRAIN_S to finish, then the
batchers stop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from . import classify, health, models, ui
from .abandon import AbandonedRequests
from .errors import install_handlers
from .classify import ClassifyFastPath
from .gate import AdmissionGate
from .security import ApiKeyMiddleware
from .tracing import RequestTracing
from .v2 import repository as v2_repository
from .v2 import routes as v2_routes
from .v2.json_worker import JsonWorker
from ..core.collector import settle
from ..core.config import Settings
from ..engine.facade import Plane
from ..engine.link.client import remote_plane
from ..engine.runtime import running_plane


def create_app(settings: Settings | None = None, *, tracer_provider: Any = None) -> FastAPI:
    """`tracer_provider`: an OpenTelemetry TracerProvider for this app's spans (tests); default: one from
    OTEL_EXPORTER_OTLP_ENDPOINT when it is set, else no tracing (app/api/otel.py)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        link = getattr(app.state, "engine_link", None)  # set in a worker process (app/supervisor.py)
        async with contextlib.AsyncExitStack() as stack:
            plane: Plane
            if link is None:
                plane = await stack.enter_async_context(running_plane(settings))
            else:
                plane = await stack.enter_async_context(remote_plane(settings, *link))
            app.state.plane = plane
            app.state.json_worker = JsonWorker()  # big /v2 JSON bodies, parsed outside this process's GIL
            stack.callback(app.state.json_worker.close)
            grpc_server = None
            if settings.grpc_port:  # the V2 protocol over gRPC, on EFFNET_GRPC_HOST or HTTP's interface (app/api/grpc)
                from .grpc.server import start_grpc

                grpc_server = app.state.grpc = await start_grpc(
                    plane, getattr(app.state, "host", "127.0.0.1"), shared_port=link is not None)
            settle()  # startup's objects out of every later garbage collection (app/core/collector.py)
            try:
                yield
            finally:
                plane.draining = True
                if grpc_server is not None:
                    # Inference has been refused since SIGTERM (draining), and uvicorn already waited up to
                    # DRAIN_S; calls still in flight get a short last grace, so the whole stop fits a pod's
                    # grace period.
                    await grpc_server.stop(min(settings.drain_s, 5.0))

    app = FastAPI(
        title="EfficientNet serving",
        version=__version__,
        description="Classify images with the EfficientNet family (B0-B7, Lite0-4, custom variants) on ONNX Runtime.",
        lifespan=lifespan,
        # FastAPI's own /docs and /redoc load their scripts from a CDN: ours serve installed files (app/api/ui.py).
        docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
    )
    install_handlers(app)
    app.include_router(ui.docs_router())
    if settings.ui:
        app.include_router(ui.page_router())
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(v2_repository.router)  # the V2 model-repository extension (before the /v2 catch-all)
    app.include_router(v2_routes.router)  # Open Inference Protocol (KServe V2)
    # Starlette runs the last middleware added first. Innermost: the /classify fast path, then the admission
    # gate, so a refusal still needs the key. Then the key. Outermost: CORS, so a browser's preflight (which never carries the key)
    # is answered, and every answer, a 401 included, carries the CORS headers the browser needs to read it.
    app.add_middleware(ClassifyFastPath)  # innermost: the common /classify request without FastAPI's routing
    app.add_middleware(AdmissionGate)
    app.add_middleware(AbandonedRequests)  # a request whose client left is cancelled, in the gate's wait too
    if settings.api_key is not None:
        # The pages and their files are public (they hold no data; their calls to the API carry the key).
        public = [ui.DOCS_PREFIX, ui.UI_PREFIX]
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value(),
                           exempt=[*settings.api_key_exempt, *public], exact=["/"] if settings.ui else [])
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"],
            expose_headers=["Retry-After", "X-Request-Id", "X-Effnet-Model", "X-Effnet-Model-Version"],
        )
    # Outermost of all: request ids, the access log and the request span, so every answer (a 401, a gate
    # refusal, a CORS preflight) carries X-Request-Id and is logged and traced.
    app.add_middleware(RequestTracing, access_log=settings.access_log, tracer_provider=tracer_provider)
    return app
