"""POST /classify: one model by name, or a policy over several (`auto`, `cascade[:a,b]`).

Thin on purpose: the query is validated here (FastAPI), the body is read by app.api.uploads, and the
model is run by the data plane (directly, or through app.policies for auto/cascade).
"""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import parse_qsl
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .answers import auto_body, cascade_body, cascade_headers, classify_body
from .fastjson import FastJSONResponse
from .docs import CLASSIFY_BODY, error_responses
from .state import plane_of
from .body import Upload, client_timeout_s
from .errors import error_response
from ..core.errors import ApiError, ClientGone
from ..core import tracing
from ..engine.dataplane import ImageResult
from ..engine.facade import Plane
from ..policies.cascade import parse_cascade, run_cascade
from ..policies.routing import MAX_BUDGET_MS, classify_auto, is_family_name
from .schemas import ClassifyResponse

MAX_TOP_K = 1000
PLAIN_TOP_K = re.compile(r"^[1-9][0-9]{0,3}$")
VERSION_HEADER = "X-Effnet-Model-Version"

router = APIRouter()


def _pretrained(results: list[ImageResult]) -> bool:
    return all(r.pretrained for r in results)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    summary="Classify one or several images",
    responses=error_responses(400, 401, 404, 413, 415, 422, 503),
    openapi_extra=CLASSIFY_BODY,
)
async def classify(
    request: Request,
    model: str | None = Query(None, description="model name from /models, `auto`, or `cascade[:a,b]`; "
                              "default: the configured default model"),
    top_k: int = Query(5, ge=1, le=MAX_TOP_K, description="how many classes to return per image"),
    budget_ms: float | None = Query(None, gt=0, le=MAX_BUDGET_MS, description="model=auto: latency budget in ms"),
    threshold: float | None = Query(None, ge=0, le=1, description="model=cascade: escalate below this top-1 probability"),
) -> Any:
    return await _handle(request, plane_of(request), model, top_k, budget_ms, threshold)


async def _handle(request: Request, plane: Plane, model: str | None, top_k: int, budget_ms: float | None,
                  threshold: float | None) -> Response:
    started = time.perf_counter()
    arrived = asyncio.get_running_loop().time()
    timeout_s = client_timeout_s(request)
    async with Upload(request, plane) as upload:
        return await upload.guard(_classify(plane, upload, model, top_k, budget_ms, threshold, started, arrived, timeout_s))


class ClassifyFastPath:
    """The common /classify request (`model` naming one model and/or a plain `top_k`, nothing else) answered by
    `_handle` directly, without FastAPI's routing, dependency solving and exception middleware: about a fifth
    of a worker's CPU per request on a small model, measured with py-spy. Anything else (auto, cascades,
    budget_ms, threshold, a value FastAPI would have to validate or refuse, an unknown parameter) goes on to
    FastAPI unchanged, so answers and errors stay FastAPI's own. Sits innermost, under the API key and the
    admission gate (app/api/app.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def simple(scope: Scope) -> tuple[str | None, int] | None:
        """(model or None, top_k) for a request this path answers, else None."""
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != "/classify":
            return None
        model, top_k, seen = None, 5, set()
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key in seen:
                return None
            seen.add(key)
            if key == "model":
                model = value
            elif key == "top_k" and PLAIN_TOP_K.match(value) and int(value) <= MAX_TOP_K:
                top_k = int(value)
            else:
                return None
        if model is not None and (not model or is_family_name(model)):
            return None
        return model, top_k

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self.simple(scope)
        plane = getattr(getattr(scope.get("app"), "state", None), "plane", None)
        if target is None or plane is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await _handle(Request(scope, receive), plane, target[0], target[1], None, None)
        except (ApiError, ClientGone) as exc:
            response = error_response(exc)  # as the app's exception handlers render them
        await response(scope, receive, send)


async def _classify(plane: Plane, upload: Upload, model: str | None, top_k: int, budget_ms: float | None,
                    threshold: float | None, started: float, arrived: float, timeout_s: float | None) -> FastJSONResponse:
    if model == "auto":
        budget = budget_ms if budget_ms is not None else plane.settings.default_budget_ms
        results, decision = await classify_auto(plane, budget, upload.images, arrived, timeout_s)
        with tracing.span("answer"):
            body = auto_body(results, decision, top_k, started, _pretrained(results))
            return FastJSONResponse(body, headers=decision.headers())
    if model is not None and is_family_name(model):
        names = parse_cascade(model, plane.settings.default_cascade)
        cut = threshold if threshold is not None else plane.settings.cascade_threshold
        outcome = await run_cascade(plane, names, cut, upload.images, arrived, timeout_s)
        with tracing.span("answer"):
            body = cascade_body(outcome, top_k, started, _pretrained(outcome.results))
            return FastJSONResponse(body, headers=cascade_headers(outcome))

    view = plane.find(model)
    async with plane.open(view, arrived, timeout_s) as call:
        results = await call.images(await upload.images())
    with tracing.span("answer"):  # building the answer and encoding it (FastJSONResponse renders at once)
        # Which version answered (one entry runs every image of a request), for clients watching a reload.
        return FastJSONResponse(classify_body(view.name, _pretrained(results), results, top_k, started),
                                headers={VERSION_HEADER: results[0].version or ""})
