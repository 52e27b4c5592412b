"""Open Inference Protocol (KServe V2) over HTTP, as tritonclient and the KServe SDK speak it.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    200 / 503
    GET  /v2/models/{m}[/versions/1]           model metadata
    GET  /v2/models/{m}[/versions/1]/ready     200 / 503 (404: no such model)
    POST /v2/models/{m}[/versions/1]/infer     inference (body format: app/api/v2/codec.py)

Every inference goes through the data plane like /classify and is counted in the same metrics. Errors
are the protocol's shape, `{"error": "message"}`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..state import plane_of
from .errors import V2_ERRORS
from ..errors import v2_response
from ..body import Upload, client_timeout_s
from .codec import HEADER, InferInput, decode_content, encode_infer
from .json_worker import parse_checked, wants_worker
from .descriptions import find_entry, metadata, model_config, model_state
from .descriptions import server_metadata as describe_server
from ...core import tracing
from ...core.errors import ApiError, NotFound
from ...engine.facade import ModelView


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe V2)"], responses=V2_ERRORS)


def _entry(request: Request, name: str, version: str | None) -> ModelView:
    return find_entry(plane_of(request), name, version)


# --- server -----------------------------------------------------------------------------
@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return describe_server()


@router.get("/health/live", summary="The process is up")
async def health_live() -> dict[str, Any]:
    return {"live": True}


@router.get("/health/ready", summary="Every configured model is loaded and warmed")
async def health_ready(request: Request) -> JSONResponse:
    ready = plane_of(request).readiness().ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


# --- models -----------------------------------------------------------------------------
async def _model_metadata(request: Request, name: str, version: str | None) -> JSONResponse:
    try:
        entry = _entry(request, name, version)
    except ApiError as exc:
        return v2_response(exc)
    # Beyond V2's fields, the index's state and reason: a model serving one version while its files on disk
    # failed to load says so here too (clients ignore fields they do not know).
    return JSONResponse({**metadata(entry), **model_state(entry)})


async def _model_ready(request: Request, name: str, version: str | None) -> JSONResponse:
    try:
        entry = _entry(request, name, version)
    except ApiError as exc:
        return v2_response(exc)
    ready = entry.serving and not plane_of(request).draining
    return JSONResponse({"name": entry.name, "ready": ready}, status_code=200 if ready else 503)


async def _model_config(request: Request, name: str, version: str | None) -> JSONResponse:
    try:
        return JSONResponse(model_config(_entry(request, name, version), plane_of(request)))
    except ApiError as exc:
        return v2_response(exc)


@router.get("/models/{name}/config", summary="Model configuration (Triton's extension)")
async def model_config_route(request: Request, name: str) -> JSONResponse:
    return await _model_config(request, name, None)


@router.get("/models/{name}/versions/{version}/config", summary="Model configuration (one version)")
async def model_version_config(request: Request, name: str, version: str) -> JSONResponse:
    return await _model_config(request, name, version)


@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(request: Request, name: str) -> JSONResponse:
    return await _model_metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)")
async def model_version_metadata(request: Request, name: str, version: str) -> JSONResponse:
    return await _model_metadata(request, name, version)


@router.get("/models/{name}/ready", summary="Model readiness")
async def model_ready(request: Request, name: str) -> JSONResponse:
    return await _model_ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (one version)")
async def model_version_ready(request: Request, name: str, version: str) -> JSONResponse:
    return await _model_ready(request, name, version)


# --- inference --------------------------------------------------------------------------
@router.post("/models/{name}/infer", summary="Inference")
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)")
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    plane = plane_of(request)
    arrived = asyncio.get_running_loop().time()
    try:
        entry = _entry(request, name, version)
        timeout_s = client_timeout_s(request)
        async with Upload(request, plane) as upload:
            return await upload.guard(_run(plane, upload, request, entry, arrived, timeout_s))
    except ApiError as exc:
        return v2_response(exc)


async def _run(plane, upload: Upload, request: Request, entry: ModelView, arrived: float,
               timeout_s: float | None) -> Response:
    loop = asyncio.get_running_loop()
    settings = plane.settings
    async with plane.open(entry, arrived, timeout_s) as call:
        body = await upload.body()
        # Off the event loop: a gzip bomb or a huge JSON header must not stall every other request.
        with tracing.span("parse"):
            # The version admitted (a reload may have swapped in one with another resolution meanwhile).
            manifest = call.view.spec
            decoded, inp = await loop.run_in_executor(plane.decode_pool, _decode_and_parse, body, request.headers,
                                                      manifest, settings, upload)
            del body  # the decompressed body, or what was parsed from it, replaces it
            if inp is None:  # big JSON: the worker process parses it, and no thread here waits for it
                assert decoded is not None  # _decode_and_parse hands back the body whenever it did not parse it
                inp = await request.app.state.json_worker.parse_async(
                    decoded, request.headers.get(HEADER), manifest, settings.max_queue, settings.max_json_bytes,
                    timeout_s=settings.json_worker_timeout_s, max_waiting=settings.json_worker_queue)
            del decoded
        results = await (call.tensors(inp.tensors) if inp.tensors is not None else call.images(inp.images))
    with tracing.span("answer"):
        logits = np.stack([r.logits for r in results])
        probs = np.stack([r.probs for r in results])
        content, headers = await loop.run_in_executor(
            plane.decode_pool, encode_infer, inp, entry.name, results[0].labels, logits, probs, results[0].version)
        return Response(content, headers=headers)


def _decode_and_parse(body: bytes, headers, manifest, settings, upload: Upload) -> tuple[bytes | None, InferInput | None]:
    """In a decode thread: the body decompressed (charged to the request's memory like a plain body; zlib frees
    the GIL) and, when its JSON is small, parsed: (None, parsed). A big JSON part is left to the worker
    process: (body, None)."""
    body = decode_content(body, headers.get("content-encoding"), settings.max_body_bytes, upload)
    header_length = headers.get(HEADER)
    if wants_worker(body, header_length):
        return body, None
    return None, parse_checked(body, header_length, manifest, settings.max_queue, settings.max_json_bytes)


@router.api_route("/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
async def not_found(rest: str) -> JSONResponse:
    return v2_response(NotFound(f"no such endpoint: /v2/{rest}"))
