"""The V2 model-repository extension, as Triton and KServe serve it:

    POST /v2/repository/index                    every model folder and its state ({"ready": true}: ready only)
    POST /v2/repository/models/{m}/load          load, or reload from disk (swapped in once warm)
    POST /v2/repository/models/{m}/unload        stop serving once queued work is done

Load and unload need EFFNET_MODEL_CONTROL=explicit, and the API key when one is set. Otherwise they are
refused with 403: Triton answers 503 there, but nothing will change by retrying, so 503's "come back
later" would be a lie. A model is named, never a path: the name must match the repository's naming rule.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..body import Upload
from ..state import plane_of
from ..errors import v2_response
from .errors import V2_ERRORS
from ...core.errors import ApiError, BadRequest
from ...engine.registry import valid_name

MAX_BODY_BYTES = 64 * 1024  # {"ready": true} or {}: anything near this is not a request of this API

router = APIRouter(prefix="/v2/repository", tags=["Open Inference Protocol (KServe V2)"], responses=V2_ERRORS)


async def _json_body(request: Request) -> dict[str, Any] | None:
    """The optional JSON body (tritonclient sends an empty one for index); None when it is not an object.
    Read like every other body (app/api/body.py: size, time and rate bounds, memory charged), and before
    anything else is decided: a body nobody wants is still read within bounds, never without."""
    async with Upload(request, plane_of(request)) as upload:  # the body stays charged while it is looked at
        raw = await upload.body(MAX_BODY_BYTES)  # refused by its declared length, or as soon as it passes the limit
        if not raw.strip():
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict) else None


@router.post("/index", summary="Every model folder in the repository, with its state")
async def index(request: Request) -> Response:
    try:
        body = await _json_body(request)
        if body is None or not isinstance(body.get("ready", False), bool):
            raise BadRequest("the body must be empty or {\"ready\": true|false}")
    except ApiError as exc:
        return v2_response(exc)
    rows = await plane_of(request).index()
    if body.get("ready"):
        rows = [r for r in rows if r.get("state") == "READY"]
    return JSONResponse(rows)


async def _control(request: Request, name: str, action: str) -> Response:
    try:
        body = await _json_body(request)
        if not valid_name(name):
            raise BadRequest("not a valid model name (lowercase letters, digits, '.', '_', '-')")
        if body is None:
            raise BadRequest("the body must be empty or a JSON object")
        plane = plane_of(request)
        # A refusal in this control mode is a 403 (ControlRefused), a load or unload that failed a 400.
        await (plane.load(name) if action == "load" else plane.unload(name))
    except ApiError as exc:
        return v2_response(exc)
    return Response(status_code=200)


@router.post("/models/{name}/load", summary="Load or reload a model from the repository")
async def load(request: Request, name: str) -> Response:
    return await _control(request, name, "load")


@router.post("/models/{name}/unload", summary="Stop serving a model once its queued work is done")
async def unload(request: Request, name: str) -> Response:
    return await _control(request, name, "unload")
