"""One JSON error shape for every failure: {"error": {"code", "message", ...extra}}.

Every error the service can answer is an `ApiError` subclass raised by our own code, so
the handlers below only translate; the catch-all exists so that a bug can never leak a
stack trace, not because any path is expected to reach it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("effnet.errors")


class ApiError(Exception):
    status = 500
    code = "internal_error"
    # Reason label for effnet_requests_rejected_total; None = not counted as a rejection.
    reject_reason: str | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


class ImageError(ApiError):
    """The bytes are not an image we can decode: empty, corrupt, truncated, a bomb."""

    status, code, reject_reason = 400, "invalid_image", "invalid_image"


class BadRequest(ApiError):
    status, code, reject_reason = 400, "bad_request", "bad_request"


class UnknownModel(ApiError):
    status, code = 404, "unknown_model"


class PayloadTooLarge(ApiError):
    status, code, reject_reason = 413, "payload_too_large", "payload_too_large"

    def __init__(self, message: str, **extra: Any) -> None:
        # Close the connection: otherwise the server keeps draining the rest of the upload
        # to reuse the connection, which is exactly the work the limit is meant to refuse.
        super().__init__(message, headers={"Connection": "close"}, **extra)


class UnsupportedMediaType(ApiError):
    status, code, reject_reason = 415, "unsupported_media_type", "unsupported_media_type"


class Unavailable(ApiError):
    """503s; all carry Retry-After because every one of them is worth retrying later."""

    status, code, reject_reason = 503, "model_unavailable", "unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **extra)


class Overloaded(Unavailable):
    code, reject_reason = "overloaded", "queue_full"


class DeadlineExceeded(Unavailable):
    code, reject_reason = "deadline_exceeded", "deadline"


class InferenceFailed(Unavailable):
    code, reject_reason = "inference_failed", "inference_error"


class ShuttingDown(Unavailable):
    code, reject_reason = "shutting_down", "shutting_down"


class ErrorDetail(BaseModel):
    code: str = Field(examples=["unknown_model"])
    message: str


class ErrorResponse(BaseModel):
    """The body of every non-2xx answer."""

    error: ErrorDetail


def _json(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Only location and message: pydantic's "input" and "ctx" would echo user input back.
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        return _json(422, "validation_error", "request parameters are invalid", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else code
        return _json(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _json(500, "internal_error", "internal error")
