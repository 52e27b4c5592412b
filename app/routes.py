"""HTTP endpoints: /classify, /models, /health, /metrics."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from app.config import Settings
from app.errors import ApiError, BadRequest, ErrorResponse, Overloaded, ShuttingDown, Unavailable, UnknownModel
from app.family import MAX_BUDGET_MS, classify_family, is_family_name
from app.metrics import CONTENT_TYPE, Metrics
from app.preprocess import Prepared, prepare
from app.registry import ModelEntry, Registry
from app.schemas import ClassifyResponse, Health, ModelInfo, ModelList, Prediction, Timing
from app.uploads import ClientGone, check_media_type, media_type, parse_multipart, read_body

MAX_TOP_K = 1000


@dataclass
class State:
    settings: Settings
    registry: Registry
    metrics: Metrics
    decode_pool: ThreadPoolExecutor
    draining: bool = False
    # Requests admitted per model and not yet answered (decoding or queued): the bound that
    # keeps latency and buffered bodies finite under overload.
    inflight: dict[str, int] = field(default_factory=dict)


def state_of(request: Request) -> State:
    return request.app.state.effnet


def _err(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "not an image, corrupt, truncated, a decompression bomb, or a malformed multipart body",
        401: "EFFNET_API_KEY is set and the request lacks it",
        404: "unknown model (the error lists the available ones)",
        413: "body larger than EFFNET_MAX_BODY_MB",
        415: "content type is neither image/*, application/octet-stream nor multipart/form-data",
        422: "invalid query parameters (e.g. top_k out of 1..1000)",
        503: "model loading, unavailable, overloaded (queue full) or past its deadline; see Retry-After",
    }
    return {c: {"model": ErrorResponse, "description": descriptions.get(c, "error")} for c in codes}


_BINARY = {"schema": {"type": "string", "format": "binary"}}
CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image as the raw body, or multipart field(s) named `file`.",
        "content": {
            "image/*": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
        },
    }
}

router = APIRouter()


# --- /classify --------------------------------------------------------------------------
@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,  # routing/cascade appear only for model=auto / cascade
    summary="Classify one or several images",
    responses=_err(400, 401, 404, 413, 415, 422, 503),
    openapi_extra=CLASSIFY_BODY,
)
async def classify(
    request: Request,
    model: str | None = Query(None, description="model name from /models; default: the configured default"),
    top_k: int = Query(5, ge=1, le=MAX_TOP_K, description="how many classes to return per image"),
    # Read by app/family.py for model=auto / model=cascade; declared here so the OpenAPI shows them.
    budget_ms: float | None = Query(None, gt=0, le=MAX_BUDGET_MS, description="model=auto: latency budget in ms"),
    threshold: float | None = Query(None, ge=0, le=1, description="model=cascade: escalate below this top-1 probability"),
) -> Any:
    if model is not None and is_family_name(model):  # auto, cascade[:a,b]: app/family.py
        return await classify_family(request, model, top_k)
    st = state_of(request)
    started = time.perf_counter()
    arrived = asyncio.get_running_loop().time()
    name = model if model is not None else st.registry.default_model
    entry = st.registry.entries.get(name) if name is not None else None
    if entry is None:
        # No metric series here: the name came from the client.
        raise UnknownModel("unknown model", available=st.registry.names())

    status = "500"
    st.inflight[name] = st.inflight.get(name, 0) + 1
    try:
        body = await _classify(request, st, entry, top_k, started, arrived)
        status = "200"
        return body
    except ApiError as exc:
        status = str(exc.status)
        if exc.reject_reason:
            st.metrics.rejected.labels(name, exc.reject_reason).inc()
        raise
    except ClientGone:
        status = "499"  # nginx's "client closed request": nobody reads this answer
        return Response(status_code=499)
    finally:
        st.inflight[name] -= 1
        st.metrics.requests.labels(name, status).inc()
        st.metrics.request_duration.labels(name, status).observe(time.perf_counter() - started)


def ensure_admissible(st: State, entry: ModelEntry) -> None:
    """The checks every inference path (/classify, cascades, /v2) makes before taking a request
    that is already counted in st.inflight: ready, not draining, not over the admission bound."""
    # Draining first: once shutdown closes the registry, every model also looks "unavailable",
    # and the client must learn the real reason (retry elsewhere soon, not in 30 s).
    if st.draining:
        raise ShuttingDown("the server is shutting down", retry_after=5)
    if entry.status != "ready" or entry.batcher is None or entry.manifest is None:
        if entry.status == "loading":
            raise Unavailable(f"model {entry.name!r} is still loading", retry_after=5)
        raise Unavailable(f"model {entry.name!r} is unavailable: {entry.reason}", retry_after=30, reason=entry.reason)
    if st.inflight[entry.name] > st.settings.max_queue:
        raise Overloaded(f"model {entry.name!r} has {st.settings.max_queue} requests in flight; retry shortly")


async def _classify(
    request: Request, st: State, entry: ModelEntry, top_k: int, started: float, arrived: float,
) -> ClassifyResponse:
    # Refuse before reading the body: under overload the cheapest answer is the fastest.
    ensure_admissible(st, entry)

    ctype, params = media_type(request)
    kind = check_media_type(ctype)
    body = await read_body(request, st.settings.max_body_bytes)
    images = [body] if kind == "raw" else parse_multipart(body, params)
    del body
    if len(images) > st.settings.max_queue:  # could never be admitted: not worth a retry
        raise BadRequest(f"at most {st.settings.max_queue} images per request")

    manifest = entry.manifest
    loop = asyncio.get_running_loop()
    with entry.batcher.incoming(len(images)):
        prepared: list[Prepared] = await asyncio.gather(
            *(
                loop.run_in_executor(st.decode_pool, prepare, data, manifest.preprocess, st.settings.max_image_pixels)
                for data in images
            )
        )
    decode_hist = st.metrics.stage_duration.labels(entry.name, "decode")
    pre_hist = st.metrics.stage_duration.labels(entry.name, "preprocess")
    for p in prepared:
        decode_hist.observe(p.decode_s)
        pre_hist.observe(p.preprocess_s)

    results = await entry.batcher.submit([p.tensor for p in prepared], arrived)

    k = min(top_k, len(manifest.labels))
    lists = [_top_k(r.probs, k, manifest.labels) for r in results]
    return ClassifyResponse(
        model=entry.name,
        pretrained=manifest.weights.pretrained,
        predictions=lists if len(lists) > 1 else lists[0],
        timing_ms=Timing(
            decode=_ms(sum(p.decode_s for p in prepared)),
            preprocess=_ms(sum(p.preprocess_s for p in prepared)),
            queue=_ms(max(r.queue_s for r in results)),
            inference=_ms(max(r.inference_s for r in results)),
            total=_ms(time.perf_counter() - started),
        ),
    )


def _top_k(probs: np.ndarray, k: int, labels: list[str]) -> list[Prediction]:
    idx = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[0] else np.arange(probs.shape[0])
    idx = sorted(idx.tolist(), key=lambda i: (-float(probs[i]), i))
    return [Prediction(index=i, label=labels[i], score=min(1.0, max(0.0, float(probs[i])))) for i in idx]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


# --- /models ----------------------------------------------------------------------------
def model_info(entry: ModelEntry) -> ModelInfo:
    info: dict[str, Any] = {"name": entry.name, "status": entry.status, "reason": entry.reason}
    m = entry.manifest
    if m is not None:
        info.update(
            family=m.family, variant=m.variant, phi=m.phi, width_mult=m.width_mult, depth_mult=m.depth_mult,
            resolution=m.resolution, preprocess=m.preprocess.model_dump(include={"resize", "crop", "interpolation", "mean", "std"}),
            params=m.params, macs=m.macs,
            accuracy={
                "reference": m.accuracy.reference.model_dump() if m.accuracy.reference else None,
                "measured": m.accuracy.measured.model_dump() if m.accuracy.measured else None,
            },
            pretrained=m.weights.pretrained, weights_source=m.weights.source,
            precision=m.precision, derived_from=m.derived_from.name if m.derived_from else None,
        )
    if entry.status == "ready" and entry.batcher is not None:
        info.update(provider=entry.provider, max_batch=entry.max_batch, batch_sizes=entry.batcher.sizes)
    return ModelInfo.model_validate(info)


@router.get("/models", response_model=ModelList, summary="Models in the repository", responses=_err(401))
async def list_models(request: Request) -> ModelList:
    reg = state_of(request).registry
    return ModelList(default=reg.default_model, models=[model_info(e) for e in reg.entries.values()])


@router.get("/models/{name}", response_model=ModelInfo, summary="One model", responses=_err(401, 404))
async def get_model(request: Request, name: str) -> ModelInfo:
    reg = state_of(request).registry
    entry = reg.entries.get(name)
    if entry is None:
        raise UnknownModel("unknown model", available=reg.names())
    return model_info(entry)


# --- health and metrics -----------------------------------------------------------------
@router.get("/health/live", response_model=Health, summary="The process is up")
async def live() -> Health:
    return Health(status="alive")


@router.get(
    "/health/ready", response_model=Health, summary="Every configured model is loaded and warmed",
    responses={503: {"model": ErrorResponse, "description": "not ready; `models` maps each name to its reason"}},
)
async def ready(request: Request) -> Any:
    st = state_of(request)
    if st.draining:
        return JSONResponse(
            {"error": {"code": "shutting_down", "message": "the server is shutting down"}}, status_code=503
        )
    if not st.registry.ready:
        pending = st.registry.not_ready()
        message = "no models configured or found" if not st.registry.entries else "models not ready: " + ", ".join(sorted(pending))
        return JSONResponse({"error": {"code": "not_ready", "message": message, "models": pending}}, status_code=503)
    return Health(status="ready", models=st.registry.names())


@router.get(
    "/metrics", summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
    response_class=Response,
)
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)

