"""Every failure the service can answer, as a class: status, code, and whether it counts as a refusal.

The front ends translate these into their protocol's error shape (app/api/errors.py for the JSON API,
the V2 routes for `{"error": ...}`); nothing here knows about HTTP frameworks.
"""

from __future__ import annotations

from typing import Any


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


class NotFound(ApiError):
    status, code = 404, "not_found"


class UnknownModel(NotFound):
    code = "unknown_model"


class Unauthenticated(ApiError):
    """EFFNET_API_KEY is set and the request does not carry it (or carries another)."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str = "missing or wrong API key", **extra: Any) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"}, **extra)


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class ControlError(ApiError):
    """A model load or unload could not be done; the message says why and is safe to show."""

    status, code = 400, "bad_request"


class ControlRefused(ControlError):
    """Load and unload are not allowed in this model-control mode (EFFNET_MODEL_CONTROL)."""

    status, code = 403, "forbidden"


class PayloadTooLarge(ApiError):
    status, code, reject_reason = 413, "payload_too_large", "payload_too_large"

    def __init__(self, message: str, **extra: Any) -> None:
        # Close the connection: otherwise the server keeps draining the rest of the upload
        # to reuse the connection, which is exactly the work the limit is meant to refuse.
        super().__init__(message, headers={"Connection": "close"}, **extra)


class RequestTimeout(ApiError):
    """The body did not arrive in time (or too slowly): the connection is closed after the answer."""

    status, code, reject_reason = 408, "request_timeout", "body_timeout"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, headers={"Connection": "close"}, **extra)


class NotImplementedHere(ApiError):
    """A method of the protocol this service does not serve (gRPC's UNIMPLEMENTED)."""

    status, code = 501, "not_implemented"


class UnsupportedMediaType(ApiError):
    status, code, reject_reason = 415, "unsupported_media_type", "unsupported_media_type"


class Unavailable(ApiError):
    """503s; all carry Retry-After because every one of them is worth retrying later."""

    status, code, reject_reason = 503, "model_unavailable", "unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **extra)


class Overloaded(Unavailable):
    code, reject_reason = "overloaded", "queue_full"


class OverBudget(Overloaded):
    """The bytes and pixels of requests in flight would exceed EFFNET_MAX_INFLIGHT_MB."""

    reject_reason = "memory"


class DeadlineExceeded(Unavailable):
    code, reject_reason = "deadline_exceeded", "deadline"


class InferenceFailed(Unavailable):
    code, reject_reason = "inference_failed", "inference_error"


class ShuttingDown(Unavailable):
    code, reject_reason = "shutting_down", "shutting_down"


class VersionStopped(ShuttingDown):
    """The model version a request waited on stopped under it, the server going on: an unload, or a reload's
    swap. A ShuttingDown to the data plane, which moves a request still waiting for room on to a reload's
    successor (dataplane.py, `moved_on`); to the client, the model's unavailability and what happened."""

    code, reject_reason = "model_unavailable", "unavailable"


class NotReady(Unavailable):
    """/health/ready while the models it waits for do not all serve yet."""

    code = "not_ready"


class ClientGone(Exception):
    """The client disconnected (mid-upload, or while its request waited): there is nobody to answer."""

