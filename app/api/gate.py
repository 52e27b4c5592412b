"""The cheapest possible "no": refusals decided before routing and before the body is read.

Under a retry storm most requests are refusals, and each one costs the event loop whatever it takes to
say no. FastAPI's routing, validation, exception handlers and JSON encoding cost about as much as a real
answer; this ASGI middleware sits in front of all of it for the two inference routes. It names the model
from the path and query string alone, asks the data plane whether the request is certainly refused
(draining, model not ready, queue still full after the admission wait) and, if so, answers from bytes
encoded once per distinct refusal. Everything else passes through untouched; the routes then admit
the request properly (the data plane's stage one again, and stage two once the body is in).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Style, send_error
from ..core.errors import UnknownModel

V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]*)?/infer$")


class AdmissionGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def _model(self, scope: Scope) -> tuple[str | None, Style] | None:
        """(model name or None for the default, "json" | "v2") for an inference request, else None."""
        path = scope.get("path", "")
        if path == "/classify":
            model = None
            for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
                if key == "model":
                    model = value
            if model is not None and (model == "auto" or model.startswith("cascade")):
                return None  # policies over several models decide for themselves
            return model, "json"
        m = V2_INFER.match(path)
        return (m.group(1), "v2") if m else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            target = self._model(scope)
            plane = getattr(getattr(scope.get("app"), "state", None), "plane", None)
            if target is not None and plane is not None:
                name, style = target
                try:
                    view = plane.find(name)
                except UnknownModel:
                    view = None  # the route answers 404
                if view is not None:
                    refusal = await plane.refusal(view)
                    if refusal is not None:
                        await send_error(send, refusal, style)
                        return
        await self.app(scope, receive, send)
