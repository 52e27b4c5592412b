"""Errors as gRPC status codes, and the API key as call metadata.

Every failure is the service's own ApiError (or a model-control error), answered with the status code
that means the same as its HTTP status; a 503's Retry-After travels as trailing metadata `retry-after`.
Anything unexpected is logged and answered INTERNAL without its text (internals stay inside).
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from ..security import exempt_prefixes, is_exempt, presented_key
from ...core.config import Settings
from ...core.errors import ApiError, ShuttingDown, Unauthenticated

log = logging.getLogger("effnet.grpc")

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    # What grpc itself answers for a message over grpc.max_receive_message_length (EFFNET_MAX_BODY_MB).
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def code_for(status: int) -> grpc.StatusCode:
    return CODES.get(status, grpc.StatusCode.INTERNAL)


def as_api_error(exc: Exception) -> ApiError:
    """Our own errors as they are (model control's included); anything else is a bug: logged, and INTERNAL."""
    if isinstance(exc, ApiError):
        return exc
    log.error("gRPC call failed", exc_info=exc)
    return ApiError("internal error")


class KeyCheck:
    """EFFNET_API_KEY over gRPC: `authorization: Bearer <key>` or `x-api-key: <key>` metadata, compared in
    constant time. The health RPCs follow EFFNET_API_KEY_EXEMPT as if they were /v2/health/live and
    /v2/health/ready (open by default, like the HTTP probes)."""

    def __init__(self, settings: Settings) -> None:
        self.key = settings.api_key.get_secret_value().encode() if settings.api_key is not None else None
        self.exempt = exempt_prefixes(settings.api_key_exempt)

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None, path: str | None) -> None:
        """`metadata`: the call's invocation metadata (its headers: read before any message)."""
        if self.key is None or (path is not None and is_exempt(path, self.exempt)):
            return
        given = presented_key({k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)})
        if given is None or not hmac.compare_digest(given.encode(), self.key):
            raise Unauthenticated()


async def abort_with(context: grpc.aio.ServicerContext, err: ApiError) -> None:
    """End the call with err's status code; a 503's Retry-After as trailing metadata. Raises AbortError."""
    trailing = (("retry-after", err.headers["Retry-After"]),) if "Retry-After" in err.headers else ()
    await context.abort(code_for(err.status), err.message, trailing_metadata=trailing)


Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def rpc(path: str | None = None, *, while_draining: bool = False) -> Callable[[Handler], Handler]:
    """Wrap a servicer method: refusal while the server drains (unless `while_draining`), and every error as
    a status code. `path`: the HTTP path whose key exemption the method follows (the key itself is checked
    before the message is read: interceptors.Guard)."""

    def wrap(method: Handler) -> Handler:
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            try:
                if self.plane.draining and not while_draining:
                    raise ShuttingDown("the server is shutting down", retry_after=5)
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a traceback
                err = as_api_error(exc)
            await abort_with(context, err)

        handler.http_path = path  # type: ignore[attr-defined]
        return handler

    return wrap
