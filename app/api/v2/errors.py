"""The V2 protocol's error body, `{"error": "message"}`, as documented on every /v2 route's OpenAPI (schemathesis
holds the service to its own spec)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ProtocolErrorBody(BaseModel):
    error: str


def _documented(**codes: str) -> dict[int | str, dict[str, Any]]:
    return {int(c[1:]): {"model": ProtocolErrorBody, "description": d} for c, d in codes.items()}


V2_ERRORS = _documented(
    s400="malformed request (header, shapes, data, binary sizes, model name)",
    s401="EFFNET_API_KEY is set and the request lacks it",
    s403="model load / unload while EFFNET_MODEL_CONTROL is not explicit",
    s404="unknown model or version",
    s408="the body did not arrive in time",
    s413="body larger than EFFNET_MAX_BODY_MB (or a JSON part over EFFNET_MAX_JSON_MB)",
    s415="unsupported Content-Encoding",
    s503="model loading, unavailable, overloaded or shutting down (see Retry-After)",
)
