"""`/classify?model=auto` and `/classify?model=cascade[:a,b]`: the family-aware model names.

routes.classify hands these names here (one hook line); everything else about /classify
(auth, limits, errors, metrics) stays the same. `auto` delegates the actual work to
routes.classify with the chosen model; a cascade reads the body once and runs each stage
through app.cascade.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.cascade import parse_cascade, run_cascade
from app.errors import ApiError, BadRequest, Unavailable
from app.routing import LatencyStats, candidate, choose, is_family_name  # noqa: F401 - re-exported for routes

MAX_BUDGET_MS = 600_000.0


@dataclass
class FamilyState:
    latency: LatencyStats = field(default_factory=LatencyStats)


def family_state(request: Request) -> FamilyState:
    app = request.app
    fam = getattr(app.state, "family", None)
    if fam is None:  # an app built without create_app's setup (tests): one on first use
        fam = app.state.family = FamilyState()
    return fam


def _query_float(request: Request, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        bound = f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        # The same 422 shape as FastAPI's own query validation.
        raise RequestValidationError([{"loc": ("query", name), "msg": f"must be a number {bound}"}])
    return v


async def classify_family(request: Request, model: str, top_k: int) -> Any:
    if model == "auto":
        return await classify_auto(request, top_k)
    return await classify_cascade(request, model, top_k)


async def classify_auto(request: Request, top_k: int) -> Any:
    from app.routes import classify, state_of

    st = state_of(request)
    fam = family_state(request)
    budget = _query_float(request, "budget_ms", st.settings.default_budget_ms, 0.0, MAX_BUDGET_MS, lo_open=True)
    cands = [c for c in (candidate(e) for e in st.registry.entries.values()) if c is not None]
    decision = choose(cands, budget, fam.latency)
    if decision is None:
        raise Unavailable("no model is ready yet", retry_after=5)
    st.metrics.auto_routed.labels(decision.chosen, str(decision.budget_missed).lower()).inc()
    started = time.perf_counter()
    try:
        resp = await classify(request, model=decision.chosen, top_k=top_k)
    except ApiError as exc:
        exc.headers = {**exc.headers, **decision.headers()}
        raise
    if isinstance(resp, Response):  # the client went away (499)
        return resp
    fam.latency.observe(decision.chosen, time.perf_counter() - started)
    body = resp.model_dump(exclude_none=True) if hasattr(resp, "model_dump") else dict(resp)
    body["routing"] = decision.to_dict()
    return JSONResponse(body, headers=decision.headers())


async def classify_cascade(request: Request, model: str, top_k: int) -> Any:
    from app.routes import state_of
    from app.uploads import (
        ClientGone,
        check_media_type,
        media_type,
        parse_multipart,
        read_body,
    )

    st = state_of(request)
    fam = family_state(request)
    started = time.perf_counter()
    arrived = asyncio.get_running_loop().time()
    names = parse_cascade(model, st.settings.default_cascade)
    threshold = _query_float(request, "threshold", st.settings.cascade_threshold, 0.0, 1.0)
    missing = [n for n in names if n not in st.registry.entries]
    if missing:
        from app.errors import UnknownModel

        raise UnknownModel("unknown model in the cascade", available=st.registry.names())
    ctype, params = media_type(request)
    kind = check_media_type(ctype)
    try:
        body = await read_body(request, st.settings.max_body_bytes)
    except ClientGone:
        return Response(status_code=499)
    images = [body] if kind == "raw" else parse_multipart(body, params)
    del body
    if len(images) > st.settings.max_queue:
        raise BadRequest(f"at most {st.settings.max_queue} images per request")
    out, headers = await run_cascade(
        st, names, threshold, images, top_k, arrived, started, on_latency=fam.latency.observe,
    )
    return JSONResponse(out, headers=headers)
