"""What the layers below the front ends know of tracing: spans by name, and what this request is about.

The engine and the front ends call only this module; it imports nothing of OpenTelemetry. A front end
(app/api/tracing.py) opens each request with `begin()`, which binds the request's `RequestTrace` and, when
tracing is on, a `SpanSink` that turns spans into real ones (app/api/otel.py). Everything is carried by
context variables, so it follows the request into the tasks it starts, and two apps in one process (tests)
never see each other's tracer.

With tracing off no sink is ever bound, and each hook costs one context-variable lookup:

    with tracing.span("decode", images=3):     # a shared no-op object when off
        ...
    tracing.batch_spans(submitted_ns, results, model="b0", model_version="1a2b3c")   # queue + inference, from the batcher's timings
    tracing.annotate(images=3, version="1a2b3c")             # feeds the access log and the request span
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol


class SpanHandle(Protocol):
    def set(self, **attrs: Any) -> None: ...


class SpanSink(Protocol):
    """A tracing backend: `span` opens a child of the current span, `record` adds one with known times."""

    def span(self, name: str, attrs: dict[str, Any]) -> Any: ...  # a context manager giving a SpanHandle

    def record(self, name: str, start_ns: int, end_ns: int, attrs: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class RequestTrace:
    """One request's facts for its access-log line and its request span, filled in as it goes."""

    request_id: str
    model: str | None = None  # once known: a loaded model's name, `auto`, `cascade` or "-", never a client's string
    images: int | None = None
    version: str | None = None


class _Off:
    """The span of a request that is not traced: enter, set and exit do nothing."""

    __slots__ = ()

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set(self, **attrs: Any) -> None:
        return None


OFF = _Off()

_request: ContextVar[RequestTrace | None] = ContextVar("effnet_request", default=None)
_sink: ContextVar[SpanSink | None] = ContextVar("effnet_span_sink", default=None)


@contextmanager
def begin(trace: RequestTrace, sink: SpanSink | None = None) -> Iterator[RequestTrace]:
    """Bind `trace` (and the span sink, if tracing is on) for the rest of this request."""
    token = _request.set(trace)
    sink_token = _sink.set(sink) if sink is not None else None
    try:
        yield trace
    finally:
        if sink_token is not None:
            _sink.reset(sink_token)
        _request.reset(token)


def current() -> RequestTrace | None:
    return _request.get()


def request_id() -> str | None:
    """The id of the request being served (for log lines), or None outside one."""
    trace = _request.get()
    return trace.request_id if trace is not None else None


def span(name: str, **attrs: Any) -> Any:
    """A child span of the current one, as a context manager giving a handle with `.set(**attrs)`."""
    sink = _sink.get()
    if sink is None:
        return OFF
    return sink.span(name, attrs)


def annotate(*, images: int, version: str | None) -> None:
    """What the data plane learns about the request: its image count and the model version that takes it.
    The first call wins (a cascade's later models see only the escalated images)."""
    trace = _request.get()
    if trace is not None and trace.images is None:
        trace.images, trace.version = images, version


def now_ns() -> int:
    """Wall-clock nanoseconds (what span times are in), 0 when tracing is off."""
    return time.time_ns() if _sink.get() is not None else 0


def batch_spans(submitted_ns: int, results: Iterable[Any], **attrs: Any) -> None:
    """A `queue` and an `inference` span for each batch the request's images ran in, placed after the fact
    from the batcher's own timings (each result's queue_s, inference_s, batch_size), so the batcher's
    thread is not instrumented. Images of one request enqueued together and run in one batch share those
    timings exactly, which is how batches are told apart here."""
    sink = _sink.get()
    if sink is None or not submitted_ns:
        return
    batches: dict[tuple[float, float, int], int] = {}
    for r in results:
        key = (r.queue_s, r.inference_s, r.batch_size)
        batches[key] = batches.get(key, 0) + 1
    for (queue_s, inference_s, batch_size), images in batches.items():
        started = submitted_ns + int(queue_s * 1e9)
        sink.record("queue", submitted_ns, started, {**attrs, "images": images})
        sink.record("inference", started, started + int(inference_s * 1e9),
                    {**attrs, "images": images, "batch_size": batch_size})
