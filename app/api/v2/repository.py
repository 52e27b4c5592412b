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

from app.api.state import plane_of
from app.api.v2.errors import V2_ERRORS
from app.engine.control import ControlRefused
from app.engine.registry import ControlError, valid_name

router = APIRouter(prefix="/v2/repository", tags=["Open Inference Protocol (KServe V2)"], responses=V2_ERRORS)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any] | None:
    """The optional JSON body (tritonclient sends an empty one for index); None when it is not an object."""
    raw = await request.body()
    if not raw.strip():
        return {}
    if len(raw) > 64 * 1024:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


@router.post("/index", summary="Every model folder in the repository, with its state")
async def index(request: Request) -> Response:
    body = await _json_body(request)
    if body is None or not isinstance(body.get("ready", False), bool):
        return _error(400, "the body must be empty or {\"ready\": true|false}")
    rows = await plane_of(request).index()
    if body.get("ready"):
        rows = [r for r in rows if r.get("state") == "READY"]
    return JSONResponse(rows)


async def _control(request: Request, name: str, action: str) -> Response:
    if not valid_name(name):
        return _error(400, "not a valid model name (lowercase letters, digits, '.', '_', '-')")
    if await _json_body(request) is None:
        return _error(400, "the body must be empty or a JSON object")
    plane = plane_of(request)
    try:
        await (plane.load(name) if action == "load" else plane.unload(name))
    except ControlRefused as exc:
        return _error(403, str(exc))
    except ControlError as exc:
        return _error(400, str(exc))
    return Response(status_code=200)


@router.post("/models/{name}/load", summary="Load or reload a model from the repository")
async def load(request: Request, name: str) -> Response:
    return await _control(request, name, "load")


@router.post("/models/{name}/unload", summary="Stop serving a model once its queued work is done")
async def unload(request: Request, name: str) -> Response:
    return await _control(request, name, "unload")
