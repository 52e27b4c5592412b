"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.api.errors import ErrorResponse
from app.api.schemas import Health
from app.api.state import plane_of
from app.engine.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health/live", response_model=Health, response_model_exclude_none=True, summary="The process is up")
async def live() -> Health:
    return Health(status="alive")


@router.get(
    "/health/ready", response_model=Health, response_model_exclude_none=True,
    summary="Ready for traffic: every model serves (EFFNET_STRICT_READINESS=false: at least one)",
    responses={503: {"model": ErrorResponse, "description": "not ready; `models` maps each name to its reason"}},
)
async def ready(request: Request) -> Any:
    plane = plane_of(request)
    if plane.draining:
        return JSONResponse({"error": {"code": "shutting_down", "message": "the server is shutting down"}}, status_code=503)
    registry = plane.registry
    if not registry.ready:
        pending = registry.not_ready() or {n: e.status for n, e in registry.entries.items()}
        message = "no models configured or found" if not registry.entries else "models not ready: " + ", ".join(sorted(pending))
        return JSONResponse({"error": {"code": "not_ready", "message": message, "models": pending}}, status_code=503)
    # Not strict: ready with some models down; they are listed with their reason, the answer is still 200.
    return Health(status="ready", models=[n for n, e in registry.entries.items() if e.status == "ready"],
                  unavailable=registry.not_ready() or None)


@router.get(
    "/metrics", summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text format"}},
    response_class=Response,
)
async def metrics(request: Request) -> Response:
    return Response(plane_of(request).metrics.render(), media_type=CONTENT_TYPE)
