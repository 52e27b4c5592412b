"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from .errors import ErrorResponse, error_response
from .schemas import Health
from .state import plane_of
from ..core.errors import NotReady, ShuttingDown
from ..engine.building import pending
from ..engine.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health/live", response_model=Health, response_model_exclude_none=True, summary="The process is up")
async def live() -> Health:
    return Health(status="alive")


@router.get(
    "/health/ready", response_model=Health, response_model_exclude_none=True,
    summary="Ready for traffic: the models asked for at start serve (EFFNET_STRICT_READINESS=true: every "
            "model in the repository; false: at least one)",
    responses={503: {"model": ErrorResponse, "description": "not ready; `models` maps each name to its reason"}},
)
async def ready(request: Request) -> Any:
    state = plane_of(request).readiness()
    if state.draining:
        return error_response(ShuttingDown("the server is shutting down"))
    # One small file read (probes come every few seconds); a model the build has yet to reach may serve already.
    building = [m for m in pending(plane_of(request).settings.repository) if m not in state.serving]
    if not state.ready:
        waiting = state.not_ready or {v.name: v.status for v in plane_of(request).views()}
        message = "no models configured or found" if not state.models else "models not ready: " + ", ".join(sorted(waiting))
        if building:
            message += "; still building: " + ", ".join(building)
        not_ready = NotReady(message, models=waiting)
        if building:
            not_ready.extra["building"] = building
        return error_response(not_ready)
    # Ready with some models down (later arrivals, or any when not strict): listed with their reason, still 200.
    return Health(status="ready", models=list(state.serving), unavailable=state.not_ready or None,
                  building=building or None)


@router.get(
    "/metrics", summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text format"}},
    response_class=Response,
)
async def metrics(request: Request) -> Response:
    return Response(await plane_of(request).metrics_text(), media_type=CONTENT_TYPE)
