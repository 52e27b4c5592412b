"""Every failure as HTTP answers it, in one place: the JSON API's shape {"error": {"code", "message", ...extra}}
and the V2 protocol's {"error": "message"} (app/api/grpc/status.py does the same for gRPC).

Every error the service can answer is an `ApiError` (app/core/errors.py) raised by our own code, so the
handlers and renderers below only translate; the catch-all exists so that a bug can never leak a stack
trace, not because any path is expected to reach it. `send_error` answers from a middleware that sits
outside FastAPI (the API key, the admission gate), with the encoded answers cached: a refusal storm costs
one dict lookup per refusal.
"""

from __future__ import annotations

import logging
import json
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from ..core.errors import ApiError, ClientGone

log = logging.getLogger("effnet.errors")


class ErrorDetail(BaseModel):
    code: str = Field(examples=["unknown_model"])
    message: str


class ErrorResponse(BaseModel):
    """The body of every non-2xx answer."""

    error: ErrorDetail


def _json(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}


def error_response(exc: ApiError | ClientGone) -> Response:
    """How our own errors are answered, by the handlers below and by routes that run outside FastAPI's."""
    if isinstance(exc, ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


Style = Literal["json", "v2"]


def style_for(path: str) -> Style:
    """The V2 protocol's error shape under /v2 (its clients decode `error` as a string), the JSON API's elsewhere."""
    return "v2" if path == "/v2" or path.startswith("/v2/") else "json"


def v2_response(exc: ApiError) -> JSONResponse:
    """The V2 protocol's error answer (KServe, Triton): {"error": "message"}."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


_encoded: dict[tuple, tuple[bytes, list[tuple[bytes, bytes]]]] = {}


async def send_error(send: Send, exc: ApiError, style: Style = "json") -> None:
    """Answer `exc` on a raw ASGI `send`, in the JSON API's shape or the V2 protocol's."""
    key = (style, exc.status, exc.code, exc.message, tuple(sorted(exc.headers.items())), repr(exc.extra))
    cached = _encoded.get(key)
    if cached is None:
        body = json.dumps(exc.body() if style == "json" else {"error": exc.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
        if len(_encoded) > 1024:  # refusals come from a bounded vocabulary; stay bounded anyway
            _encoded.clear()
        cached = _encoded[key] = (body, headers)
    body, headers = cached
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> Response:
        return error_response(exc)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Only location and message: pydantic's "input" and "ctx" would echo user input back.
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        return _json(422, "validation_error", "request parameters are invalid", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else code
        if style_for(request.url.path) == "v2":  # a path or method /v2 does not have (404, 405)
            return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return _json(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this one from outside every middleware, so RequestTracing (app/api/tracing.py)
        # cannot add the request id to it: done here.
        rid = request.scope.get("state", {}).get("request_id")
        log.exception("unhandled error (request %s)", rid or "-", exc_info=exc)
        return _json(500, "internal_error", "internal error", headers={"X-Request-Id": rid} if rid else None)
