"""The one inference path under every front end: admit, reserve, decode, submit, label.

Every way in (/classify, /v2 over HTTP and gRPC, cascades, `model=auto`) calls this module and only this
module to run a model, so admission, deadlines, metrics and latency samples are decided and recorded in
one place, in one unit:

    async with plane.open(entry, arrived) as call:  # stage 1: admitted, or refused (503): nothing read yet
        images = await read_the_body()               # the front end's business
        results = await call.images(images)          # stage 2: queue room for all of them, or none;
                                                     # then decode off the loop, submit, label

Admission has two stages because the image count is only known once the body is in:
* stage one (open) refuses what is already known to fail (draining, model not ready, too many uploads
  at once, a queue that stays full for the admission wait), and holds no queue room, so a slow upload
  cannot lock other clients out;
* stage two (images/tensors) reserves room for every image of the request, waiting behind earlier
  requests for at most what is left of the admission wait, before any image is decoded.
A refused request has waited the admission wait (by default the queue's drain time, 1..2 s), which throttles
clients that retry at once; waiters are woken newest first, so an admitted request has waited little.

Front ends reach this class only through the verbs of `facade.Plane` (models as `ModelView` snapshots,
readiness, admission, model control, routing figures, metrics), so that a worker process can hold a client
that asks the same of an engine process instead (app/engine/link).

A `Call` counts as in flight from `open` until its block ends; on the way out it records the request's
status and duration once, whatever happened inside (an answer, a refusal, a client that left), and the
images it gave up on before inference as skipped.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import Executor

import numpy as np

from ..core import tracing
from ..core.config import Settings
from ..core.errors import ApiError, BadRequest, ClientGone, Overloaded, ShuttingDown, Unavailable, UnknownModel
from .batcher import Result
from .control import ModelControl
from .facade import ImageResult, ModelView, Prediction, Readiness, RouteInfo  # noqa: F401 - re-exported
from .memory import MemoryBudget, UploadCount
from .metrics import Metrics
from .preprocess import PixelAllowance, Prepared, prepare
from .registry import ModelEntry, Registry
from .stats import ServiceStats


class DataPlane:
    def __init__(self, settings: Settings, registry: Registry, metrics: Metrics, decode_pool: Executor) -> None:
        self.settings = settings
        self.registry = registry
        self.control = ModelControl(registry, metrics, settings.model_control, settings.poll_s)
        self.metrics = metrics  # the observer of every event (app/engine/observe.py), and /metrics
        self.decode_pool = decode_pool
        self.stats = ServiceStats()
        self.memory = MemoryBudget(settings.max_inflight_bytes)
        self._drain_began: float | None = None  # loop time (see `draining`)
        # Requests admitted per model and not yet finished (uploading, decoding or queued).
        self.inflight: dict[str, int] = {}
        self.uploads = UploadCount(settings.max_uploads)  # requests still sending their body, across models

    @property
    def uploading(self) -> int:
        return self.uploads.used

    @property
    def draining(self) -> bool:
        return self._drain_began is not None

    @draining.setter
    def draining(self, value: bool) -> None:
        """Set when shutdown begins: new requests are refused from then on, those that arrived before are not."""
        if not value:
            self._drain_began = None
        elif self._drain_began is None:
            # The clock of loop.time() (asyncio's is time.monotonic; uvloop's the same clock in whole ms), read
            # here without a loop: a signal handler or another thread may set this.
            self._drain_began = time.monotonic()

    # --- the facade (facade.Plane): what front ends may ask ----------------------------------
    def find(self, name: str | None) -> ModelView:
        """The named model (the default one for None), or UnknownModel (404)."""
        return view_of(self.entry(name))

    def knows(self, name: str) -> bool:
        return name in self.registry.entries

    def views(self) -> list[ModelView]:
        return [view_of(e) for e in list(self.registry.entries.values())]

    def default_model(self) -> str | None:
        return self.registry.default_model

    def readiness(self) -> Readiness:
        reg = self.registry
        return Readiness(
            ready=reg.ready and not self.draining, draining=self.draining, models=tuple(reg.entries),
            serving=tuple(n for n, e in reg.entries.items() if e.status == "ready"), not_ready=reg.not_ready(),
        )

    async def route_info(self) -> dict[str, RouteInfo]:
        return {
            name: RouteInfo(self.queue_drain_ms(e), self.stats.p95_ms(name), self.stats.samples(name),
                            self.stats.recently_refused(name), self.stats.p50_ms(name))
            for name, e in list(self.registry.entries.items()) if e.batcher is not None
        }

    async def index(self) -> list[dict[str, str]]:
        return self.registry.index()

    async def load(self, name: str) -> None:
        await self.control.load(name)

    async def unload(self, name: str) -> None:
        await self.control.unload(name)

    def note_auto_routed(self, name: str, budget_missed: bool) -> None:
        self.metrics.auto_chose(name, budget_missed)

    def note_escalations(self, cascade: str, from_model: str, to_model: str, n: int) -> None:
        self.metrics.escalated(cascade, from_model, to_model, n)

    def note_client_left(self, name: str, seconds: float) -> None:
        """A worker's request whose client left before the worker asked for admission (a lone request asks once
        its body is read: link/client.py): a 499, as a call closed that way is counted in one process."""
        if name in self.registry.entries:  # a name from a worker's copy of the state, not any string
            self.metrics.request_finished(name, "499", max(0.0, seconds))

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    def _live(self, target: ModelEntry | ModelView) -> ModelEntry:
        """The registry's entry for a view (front ends hold views); an entry as it is (the engine's own use)."""
        if isinstance(target, ModelEntry):
            return target
        entry = self.registry.entries.get(target.name)
        if entry is None:
            raise UnknownModel("unknown model", available=self.registry.names())
        return entry

    # --- which model -------------------------------------------------------------------
    def entry(self, name: str | None) -> ModelEntry:
        """The named model (the default one for None). No metric series for unknown names: they come
        from the client."""
        name = name if name is not None else self.registry.default_model
        entry = self.registry.entries.get(name) if name is not None else None
        if entry is None:
            raise UnknownModel("unknown model", available=self.registry.names())
        return entry

    @staticmethod
    def current(entry: ModelEntry) -> ModelEntry:
        """The entry that takes new work for this model: a reload's successor once the old one stops."""
        while entry.successor is not None and (entry.batcher is None or entry.batcher.room.closing):
            entry = entry.successor
        return entry

    def moved_on(self, entry: ModelEntry) -> bool:
        """Whether a request that was waiting for room in `entry`'s queue when it closed goes on to the successor:
        a reload swapped the model (not an unload, not a shutdown). Nothing of it was queued there yet."""
        return not self.draining and entry.successor is not None

    def queue_drain_ms(self, entry: ModelEntry) -> float:
        """How long an image arriving now would wait before its inference starts, from the queue as it is."""
        b = entry.batcher
        return 0.0 if b is None else 1000.0 * b.queued * b.per_image_s

    # --- admission ---------------------------------------------------------------------
    def open(self, target: ModelEntry | ModelView, arrived: float | None = None, timeout_s: float | None = None) -> Call:
        """`timeout_s`: the client's own deadline from arrival, which can only shorten EFFNET_REQUEST_TIMEOUT_S."""
        loop_now = asyncio.get_running_loop().time()
        return Call(self, self._live(target), loop_now if arrived is None else arrived, timeout_s)

    def check_admissible(self, entry: ModelEntry, arrived: float | None = None) -> None:
        """Ready and not draining: what can be decided without waiting. A request that `arrived` (loop time)
        before the drain began is in flight, and is served while its model still is: one process opens its call
        before reading the body, a worker asks the engine only once the body is in (link/client.py), and both
        must serve what was on its way at SIGTERM."""
        # Draining first: once shutdown closes the registry every model also looks unavailable, and the
        # client must learn the real reason (retry elsewhere soon, not in 30 s).
        began = self._drain_began
        if began is not None and (arrived is None or arrived >= began):
            raise ShuttingDown("the server is shutting down", retry_after=5)
        if entry.status != "ready" or entry.batcher is None or entry.manifest is None:
            if began is not None:
                raise ShuttingDown("the server is shutting down", retry_after=5)
            if entry.status == "loading":
                raise Unavailable(f"model {entry.name!r} is still loading", retry_after=5)
            raise Unavailable(f"model {entry.name!r} is unavailable: {entry.reason}", retry_after=30, reason=entry.reason)

    def admission_wait_s(self, entry: ModelEntry) -> float:
        """How long a request may wait for queue room: EFFNET_ADMISSION_WAIT_MS, else the time the full queue
        takes to drain at the model's recent speed, but at least 1 s (the shortest Retry-After a refusal
        carries) and at most 2 s. A client that ignores Retry-After and resends at once is held that long
        instead: measured with 256 such clients against a queue of 32 on b0, each refusal costs the event loop
        ~0.4 ms, and a 0.1 s wait (2,000 refusals a second) kept 0.55 of capacity where 1 s kept 0.85.
        Stage-one waiters are woken newest first (engine/queue_room.py), so an admitted request has waited
        little; the wait bounds how often a refused client comes back."""
        if self.settings.admission_wait_ms is not None:
            return self.settings.admission_wait_ms / 1000.0
        b = entry.batcher
        if b is None or not b.per_image_s:
            return 1.0
        return min(2.0, max(1.0, b.max_queue * b.per_image_s))

    async def refusal(self, target: ModelEntry | ModelView) -> ApiError | None:
        """Stage one for a front end that has not routed the request yet: the refusal it would certainly
        get (draining, not ready, a queue that stays full for the admission wait), recorded; else None."""
        entry = self.current(self._live(target))
        try:
            while True:
                self.check_admissible(entry)
                try:
                    await entry.room.wait_for_room(self.admission_wait_s(entry))
                    return None
                except ShuttingDown:
                    if not self.moved_on(entry):
                        raise
                    entry = self.current(entry)
        except ApiError as exc:
            if isinstance(exc, Overloaded):
                self.stats.refused(entry.name)
                exc.headers = {**exc.headers, "Retry-After": str(self.retry_after_s(entry))}
            if exc.reject_reason:
                self.metrics.request_refused(entry.name, exc.reject_reason)
            self.metrics.request_finished(entry.name, str(exc.status), None)
            return exc

    def retry_after_s(self, entry: ModelEntry) -> int:
        """Whole seconds until the queue would have drained: what Retry-After says when it is full."""
        b = entry.batcher
        return max(1, int(b.max_queue * b.per_image_s + 0.999)) if b is not None and b.per_image_s else 1


class Call:
    """One request's use of one model. See the module docstring."""

    def __init__(self, plane: DataPlane, entry: ModelEntry, arrived: float, timeout_s: float | None) -> None:
        self.plane, self.entry, self.arrived, self.timeout_s = plane, entry, arrived, timeout_s
        self.started = time.perf_counter()
        loop = asyncio.get_running_loop()
        timeout = plane.settings.request_timeout_s if timeout_s is None else min(timeout_s, plane.settings.request_timeout_s)
        self._deadline = arrived + timeout
        # Stage one's wait and stage two's share one admission wait (an entry without a batcher is refused
        # in __aenter__, unless a reload's successor takes the work: then it waits as long as any other).
        self._admit_by = loop.time() + plane.admission_wait_s(entry)

    @property
    def view(self) -> ModelView:
        """The model version this call runs on (after a reload's swap, the successor's)."""
        return view_of(self.entry)

    def _wait_left(self) -> float:
        now = asyncio.get_running_loop().time()
        return max(0.0, min(self._admit_by, self._deadline) - now)

    async def __aenter__(self) -> Call:
        plane, name = self.plane, self.entry.name
        plane.inflight[name] = plane.inflight.get(name, 0) + 1
        try:
            while True:
                self.entry = plane.current(self.entry)
                plane.check_admissible(self.entry, self.arrived)
                try:
                    # The admission gate (app/api/gate.py) has queued this request fairly already, if it could.
                    await self.entry.room.wait_for_room(self._wait_left(), in_line=False)
                    break
                except ShuttingDown:
                    if not plane.moved_on(self.entry):
                        raise
        except BaseException as exc:
            self._close(exc)
            raise
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        plane, name = self.plane, self.entry.name
        if exc is None:
            status = "200"
        elif isinstance(exc, ApiError):
            status = str(exc.status)
            if exc.reject_reason:
                plane.metrics.request_refused(name, exc.reject_reason)
            if isinstance(exc, Overloaded):
                plane.stats.refused(name)
                self._advise(exc)
        elif isinstance(exc, (ClientGone, asyncio.CancelledError)):
            status = "499"  # nginx's "client closed request": nobody reads the answer
        else:
            status = "500"
        plane.inflight[name] -= 1
        plane.metrics.request_finished(name, status, time.perf_counter() - self.started)

    def _advise(self, exc: Overloaded) -> None:
        """When to come back (Retry-After): no sooner than the full queue would have drained."""
        told = int(exc.headers.get("Retry-After", "1"))
        exc.headers = {**exc.headers, "Retry-After": str(max(told, self.plane.retry_after_s(self.entry)))}

    def _check_count(self, n: int) -> None:
        limit = self.plane.settings.max_queue
        if n < 1:
            raise BadRequest("the request holds no image")
        if n > limit:  # could never be admitted: not worth a retry
            raise BadRequest(f"at most {limit} images per request")

    async def _reserve(self, n: int):
        while True:
            # Reloaded while this request was being read: the old version takes no new work, its successor does.
            self.entry = self.plane.current(self.entry)
            tracing.annotate(images=n, version=self.entry.version)  # for the access log and the request span
            if self.entry.batcher is None:  # unloaded meanwhile
                self.plane.check_admissible(self.entry, self.arrived)
            try:
                with tracing.span("admission", images=n):
                    return await self.entry.room.reserve_within(n, self._wait_left())
            except ShuttingDown:
                if not self.plane.moved_on(self.entry):
                    raise

    async def reserve(self, n: int):
        """Stage two alone, for a worker process that decodes the images itself (app/engine/link): queue room
        for n images (a Reservation to submit them on), or a refusal."""
        self._check_count(n)
        try:
            return await self._reserve(n)
        except Overloaded as exc:
            # The worker answers its client with this copy before it tells the engine to close the call (where
            # _close would say when to come back, too late for the answer).
            self._advise(exc)
            raise

    def record_prepared(self, name: str, prep: list[tuple[float, float]], results: list[Result]) -> None:
        """What images() records about images a worker decoded: (decode_s, preprocess_s) each, with its answer."""
        for (decode_s, preprocess_s), r in zip(prep, results):
            self.plane.metrics.image_prepared(name, decode_s, preprocess_s)
            self.plane.stats.observe(name, decode_s + preprocess_s + r.inference_s)

    def _skipped(self, n: int, why: str) -> None:
        self.plane.metrics.images_dropped(self.entry.name, why, n)

    async def images(self, data: list[bytes]) -> list[ImageResult]:
        """Encoded images -> answers, in order. Queue room for all of them is held before any is decoded."""
        self._check_count(len(data))
        with await self._reserve(len(data)) as room:
            entry, plane = self.entry, self.plane  # after the reservation: a reload may have moved us on
            pp, max_pixels = entry.spec.preprocess, plane.settings.max_image_pixels
            try:
                prepared = await decode_all(plane.decode_pool, data, pp, max_pixels, plane.memory, entry.name,
                                            plane.settings.max_request_pixels)
            except asyncio.CancelledError:
                self._skipped(len(data), "client_gone")  # nothing of it reaches the model
                raise
            for p in prepared:
                plane.metrics.image_prepared(entry.name, p.decode_s, p.preprocess_s)
            with tracing.span("submit"):  # the batcher's queue, its run and the wake-ups either side
                submitted = tracing.now_ns()
                results = await room.submit([p.tensor for p in prepared], self.arrived, self._timeout())
        tracing.batch_spans(submitted, results, model=entry.name, model_version=entry.version)
        for p, r in zip(prepared, results):
            plane.stats.observe(entry.name, p.decode_s + p.preprocess_s + r.inference_s)
        return [self._result(r, p.decode_s, p.preprocess_s) for p, r in zip(prepared, results)]

    async def tensors(self, xs: list[np.ndarray]) -> list[ImageResult]:
        """Already-preprocessed [3, crop, crop] float32 tensors -> answers, in order."""
        self._check_count(len(xs))
        with await self._reserve(len(xs)) as room:
            with tracing.span("submit"):
                submitted = tracing.now_ns()
                results = await room.submit(xs, self.arrived, self._timeout())
        tracing.batch_spans(submitted, results, model=self.entry.name, model_version=self.entry.version)
        return [self._result(r, 0.0, 0.0) for r in results]

    def _timeout(self) -> float:
        return self._deadline - self.arrived

    def _result(self, r: Result, decode_s: float, preprocess_s: float) -> ImageResult:
        return ImageResult(
            self.entry.name, r.probs, r.logits, self.entry.spec.labels, decode_s, preprocess_s,
            r.queue_s, r.inference_s, r.batch_size, self.entry.version, self.entry.spec.weights.pretrained,
            self.entry.provider,
        )


async def decode_all(pool: Executor, data: list[bytes], pp, max_pixels: int, budget: MemoryBudget,
                     model: str, request_pixels: int | None = None) -> list[Prepared]:
    """Decode and preprocess a request's images in parallel on the decode pool, each charged to the budget
    and, together, to the request's pixel allowance (EFFNET_MAX_REQUEST_PIXELS)."""
    loop = asyncio.get_running_loop()
    allowance = PixelAllowance(request_pixels) if request_pixels else None
    # One span for the request's images together: they decode in parallel, and each one's own
    # decode/preprocess times are in the answer and on /metrics already.
    with tracing.span("decode", model=model, images=len(data)):
        return await asyncio.gather(*(
            loop.run_in_executor(pool, functools.partial(prepare, d, pp, max_pixels, budget=budget, pixels=allowance)) for d in data
        ))


def view_of(entry: ModelEntry) -> ModelView:
    """A snapshot of an entry that front ends may hold: no session, no batcher."""
    b = entry.batcher
    return ModelView(
        name=entry.name, status=entry.status, reason=entry.reason, version=entry.version, manifest=entry.manifest,
        provider=entry.provider, max_batch=entry.max_batch,
        batch_sizes=tuple(b.sizes) if b is not None and entry.status == "ready" else None, drift=entry.drift,
        revision=entry.revision,
    )
