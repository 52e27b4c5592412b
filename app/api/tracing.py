"""Every HTTP request gets an id, an access-log line and, when tracing is on, a request span.

The outermost middleware of the app (app/api/app.py), so that refusals made further in (the API key's
401, the admission gate's 503, a CORS preflight) are covered like answers. A pure ASGI middleware: it
runs for every request, refusals under a retry storm included, and costs only what it does.

* `X-Request-Id` on every answer: the client's own when it is 1..128 characters of letters, digits and
  `-_.:/+@` (a UUID, a W3C or B3 trace id), else 32 new random hex digits. No blank, `=`, quote or control
  character: the id is logged as one `id=` field, and one with a space could forge others. The id is in
  `scope["state"]["request_id"]` (request.state.request_id) and in app.core.tracing for the rest of the request.
* One line per request on the `effnet.access` logger (EFFNET_ACCESS_LOG=false turns it off):

      POST /classify model=b0 status=200 images=2 ms=14.2 id=5f0c...

  Nothing the client wrote is logged as sent: the method is one httptools knows, the path is percent-encoded
  again (`_loggable`), `model` is a loaded model's name, `auto`, `cascade` or `-`, and the id is as above.
  `images` is `-` until the data plane has seen the request's images.
* With a span sink (app/api/otel.py) a `request` span, parent of the body, decode, queue, inference and
  answer spans opened further in, with the request id, model, version, image count and status.
"""

from __future__ import annotations

import logging
import os
import re
import time
from urllib.parse import parse_qsl, quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .otel import OtelSpans, provider_from_env
from ..core import tracing
from ..policies.routing import is_family_name

log = logging.getLogger("effnet.access")

HEADER = b"x-request-id"
MAX_ID_CHARS = 128
SAFE_ID = re.compile(rb"[A-Za-z0-9._:/+@-]{1,%d}" % MAX_ID_CHARS)
MAX_LOGGED_PATH = 256
PATH_SAFE = "/:@!$&'()*+,;~"  # RFC 3986's path characters less "=": no `key=value` can appear in the path field
# Paths that name a model: /models/{m}, /v2/models/{m}/..., /v2/repository/models/{m}/...
MODEL_PATH = re.compile(r"^/(?:v2/(?:repository/)?)?models/([^/]+)")


def client_request_id(raw: bytes | None) -> bytes | None:
    """The client's id if it is fit to echo and log (SAFE_ID: 1..128 of a safe alphabet), else None."""
    if raw and SAFE_ID.fullmatch(raw):
        return raw
    return None


def new_request_id() -> bytes:
    # 128 random bits as 32 hex digits, like a uuid4's hex; os.urandom is 5x cheaper than uuid.uuid4().
    return os.urandom(16).hex().encode("ascii")


def model_of(scope: Scope) -> str:
    """The model a request names, for the log and the span: only names the registry knows (the client
    could send anything), the two policies, or "-"."""
    plane = getattr(getattr(scope.get("app"), "state", None), "plane", None)
    if plane is None:
        return "-"
    path = scope.get("path", "")
    if path == "/classify":
        name = None
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if key == "model":
                name = value
        if name is None:
            name = plane.default_model()
        elif is_family_name(name):
            return "auto" if name == "auto" else "cascade"
    else:
        m = MODEL_PATH.match(path)
        name = m.group(1) if m else None
    return name if name is not None and plane.knows(name) else "-"


def _loggable(path: str) -> str:
    """The path as one positional field: a client could put a newline in it to forge a line, a space to
    forge fields, or `status=200` to forge a key a log parser looks for. Percent-encoded again, as the client
    had to send it (an ordinary path comes back unchanged)."""
    return quote(path[:MAX_LOGGED_PATH], safe=PATH_SAFE)


class RequestTracing:
    def __init__(self, app: ASGIApp, access_log: bool = True, tracer_provider: object | None = None) -> None:
        self.app = app
        self.access_log = access_log
        provider = tracer_provider if tracer_provider is not None else provider_from_env()
        self.spans = OtelSpans(provider) if provider is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        raw = traceparent = None
        for key, value in scope["headers"]:
            if key == HEADER:
                raw = value
            elif key == b"traceparent":
                traceparent = value
        rid = client_request_id(raw) or new_request_id()
        request_id = rid.decode("ascii")
        scope.setdefault("state", {})["request_id"] = request_id
        trace = tracing.RequestTrace(request_id)
        status = 500  # what the client gets if the app raises before answering (the error handler's 500)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (HEADER, rid)]
            await send(message)

        with tracing.begin(trace, self.spans):
            try:
                if self.spans is None:
                    await self.app(scope, receive, send_with_id)
                else:
                    tp = traceparent.decode("latin-1") if traceparent is not None else None
                    with self.spans.request(scope["method"], scope["path"], tp) as span:
                        try:
                            await self.app(scope, receive, send_with_id)
                        finally:
                            trace.model = model_of(scope)
                            self.spans.finish_request(span, status, {
                                "request_id": request_id, "model": trace.model, "model_version": trace.version,
                                "images": trace.images})
            finally:
                if self.access_log:
                    self._log(scope, trace, status, started)

    @staticmethod
    def _log(scope: Scope, trace: tracing.RequestTrace, status: int, started: float) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        log.info("%s %s model=%s status=%d images=%s ms=%.1f id=%s", scope["method"], _loggable(scope["path"]),
                 trace.model or model_of(scope), status, "-" if trace.images is None else trace.images,
                 (time.perf_counter() - started) * 1000.0, trace.request_id)
