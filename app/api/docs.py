"""OpenAPI fragments shared by the routes: the error answers each can give and the /classify body."""

from __future__ import annotations

from typing import Any

from .errors import ErrorResponse

_DESCRIPTIONS = {
    400: "not an image, corrupt, truncated, a decompression bomb, or a malformed multipart body",
    401: "EFFNET_API_KEY is set and the request lacks it",
    404: "unknown model (the error lists the available ones)",
    413: "body larger than EFFNET_MAX_BODY_MB",
    415: "content type is neither image/*, application/octet-stream nor multipart/form-data",
    422: "invalid query parameters (e.g. top_k out of 1..1000)",
    503: "model loading, unavailable, overloaded (queue full) or past its deadline; see Retry-After",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(c, "error")} for c in codes}


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
