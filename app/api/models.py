"""GET /models and /models/{name}: what the repository holds and how each model is doing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from .docs import error_responses
from .schemas import LatencyInfo, ModelInfo, ModelList
from .state import plane_of
from ..engine.facade import ModelView, RouteInfo

router = APIRouter()


def model_info(entry: ModelView, stats: RouteInfo | None = None) -> ModelInfo:
    info: dict[str, Any] = {"name": entry.name, "status": entry.status, "reason": entry.reason or entry.drift, "version": entry.version}
    m = entry.manifest
    if m is not None:
        info.update(
            family=m.family, variant=m.variant, phi=m.phi, width_mult=m.width_mult, depth_mult=m.depth_mult,
            resolution=m.resolution,
            preprocess=m.preprocess.model_dump(include={"resize", "crop", "interpolation", "mean", "std"}),
            params=m.params, macs=m.macs,
            accuracy={
                "reference": m.accuracy.reference.model_dump() if m.accuracy.reference else None,
                "measured": m.accuracy.measured.model_dump() if m.accuracy.measured else None,
            },
            pretrained=m.weights.pretrained, weights_source=m.weights.source,
            weights_format=getattr(m.weights, "format", None), padding=getattr(m, "padding", None),
            precision=m.precision, derived_from=m.derived_from.name if m.derived_from else None,
        )
    if entry.serving and entry.batch_sizes is not None:
        info.update(provider=entry.provider, max_batch=entry.max_batch, batch_sizes=list(entry.batch_sizes))
    if entry.serving and stats is not None:
        info.update(latency=LatencyInfo(p50_ms=stats.p50_ms, p95_ms=stats.p95_ms, samples=stats.samples))
    return ModelInfo.model_validate(info)


@router.get("/models", response_model=ModelList, summary="Models in the repository", responses=error_responses(401))
async def list_models(request: Request) -> ModelList:
    plane = plane_of(request)
    stats = await plane.route_info()
    return ModelList(default=plane.default_model(), models=[model_info(v, stats.get(v.name)) for v in plane.views()])


@router.get("/models/{name}", response_model=ModelInfo, summary="One model", responses=error_responses(401, 404))
async def get_model(request: Request, name: str) -> ModelInfo:
    plane = plane_of(request)
    view = plane.find(name)
    return model_info(view, (await plane.route_info()).get(view.name))
