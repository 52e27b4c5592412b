"""OpenTelemetry behind app.core.tracing: optional (the `otel` extra), imported only when tracing is on.

Tracing is on when the app factory is handed a tracer provider (tests) or OTEL_EXPORTER_OTLP_ENDPOINT
(or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set. Then a provider of our own exports over OTLP/HTTP in
batches (BatchSpanProcessor: a background thread, nothing is exported in the request path); the exporter
reads the endpoint, headers and timeouts from the OTEL_* variables itself, and the SDK flushes it at exit.
The provider belongs to the app and is never made OpenTelemetry's global one: that can be set only once
per process, and a global provider would also switch on FastAPI's own request spans (doubling ours).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from .. import __version__

log = logging.getLogger("effnet.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
PREFIX = "effnet."  # our attributes: effnet.model, effnet.images, ... (the HTTP ones use semantic names)


def provider_from_env() -> Any | None:
    """A tracer provider exporting to the OTLP endpoint in the environment; None when none is set (or the
    SDK is missing: a warning, and the server runs untraced)."""
    if not any(os.environ.get(v) for v in ENDPOINT_VARIABLES):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed "
                    "(pip install 'effnet-serve[otel]'): no traces are sent")
        return None
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win; our name is only the default.
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "effnet-serve"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("tracing: spans go to %s", os.environ.get(ENDPOINT_VARIABLES[1]) or os.environ.get(ENDPOINT_VARIABLES[0]))
    return provider


def _named(attrs: dict[str, Any]) -> dict[str, Any]:
    return {PREFIX + k: v for k, v in attrs.items() if v is not None}  # OpenTelemetry refuses None values


class _Handle:
    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def set(self, **attrs: Any) -> None:
        self._span.set_attributes(_named(attrs))


class OtelSpans:
    """The span sink of app.core.tracing, on an OpenTelemetry tracer provider."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = provider.get_tracer("effnet-serve", __version__)
        self._server = trace.SpanKind.SERVER
        self._error = trace.StatusCode.ERROR
        self._propagator = TraceContextTextMapPropagator()

    @contextlib.contextmanager
    def request(self, method: str, path: str, traceparent: str | None) -> Iterator[Any]:
        """The request's root span; a W3C `traceparent` from the caller (a proxy, a client) makes it a child
        of the caller's trace."""
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        attrs = {"http.request.method": method, "url.path": path}
        with self._tracer.start_as_current_span("request", context=parent, kind=self._server, attributes=attrs) as s:
            yield s

    def finish_request(self, span: Any, status: int, attrs: dict[str, Any]) -> None:
        span.set_attributes(_named(attrs))
        span.set_attribute("http.response.status_code", status)
        if status >= 500:  # a server span is in error for 5xx only; a 4xx is the client's
            span.set_status(self._error)

    @contextlib.contextmanager
    def span(self, name: str, attrs: dict[str, Any]) -> Iterator[_Handle]:
        with self._tracer.start_as_current_span(name, attributes=_named(attrs)) as s:
            yield _Handle(s)

    def record(self, name: str, start_ns: int, end_ns: int, attrs: dict[str, Any]) -> None:
        s = self._tracer.start_span(name, start_time=start_ns, attributes=_named(attrs))
        s.end(end_time=end_ns)
