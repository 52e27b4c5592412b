"""Optional API key, checked before anything reads the body.

A pure ASGI middleware rather than a FastAPI dependency, so a request without the key is
refused before the upload is streamed in. Accepts `Authorization: Bearer <key>` or
`X-API-Key: <key>`; compared with hmac.compare_digest so timing does not reveal how much of
a guess was right.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import send_error, style_for
from ..core.errors import Unauthenticated


def exempt_prefixes(exempt: list[str]) -> tuple[str, ...]:
    return tuple(p.rstrip("/") for p in exempt if p)


def is_exempt(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: `X-API-Key: <key>`, else `Authorization: Bearer <key>` (lowercase names;
    gRPC metadata alike). Compare it with hmac.compare_digest."""
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given


class ApiKeyMiddleware:
    """`exempt`: path prefixes reachable without the key; `exact`: single paths so reachable (the page at "/",
    which as a prefix would exempt everything)."""

    def __init__(self, app: ASGIApp, key: str, exempt: list[str], exact: list[str] | None = None) -> None:
        self.app = app
        self.key = key.encode()
        self.exempt = exempt_prefixes(exempt)
        self.exact = frozenset(exact or ())

    def _exempt(self, path: str) -> bool:
        return path in self.exact or is_exempt(path, self.exempt)

    def _authorised(self, headers: Headers) -> bool:
        given = presented_key(headers)
        return given is not None and hmac.compare_digest(given.encode(), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope.get("path", "")) or self._authorised(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        await send_error(send, Unauthenticated(), style_for(scope.get("path", "")))
