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

A `Call` counts as in flight from `open` until its block ends; on the way out it records the request's
status and duration once, whatever happened inside (an answer, a refusal, a client that left), and the
images it gave up on before inference as skipped.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from app.core import tracing
from app.core.config import Settings
from app.core.errors import ApiError, BadRequest, ClientGone, Overloaded, ShuttingDown, Unavailable, UnknownModel
from app.engine.batcher import Result
from app.engine.control import ModelControl
from app.engine.memory import MemoryBudget
from app.engine.metrics import Metrics
from app.engine.preprocess import Prepared, prepare
from app.engine.registry import ModelEntry, Registry
from app.engine.stats import ServiceStats


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float  # softmax probability

    def as_dict(self) -> dict:
        return {"index": self.index, "label": self.label, "score": self.score}


@dataclass(frozen=True)
class ImageResult:
    """One image's answer from one model, with where its time went (seconds)."""

    model: str
    probs: np.ndarray  # softmax, [classes]
    logits: np.ndarray  # the model's raw output row
    labels: list[str]
    decode_s: float
    preprocess_s: float
    queue_s: float
    inference_s: float
    batch_size: int
    # The version (registry.ModelEntry.version) that computed it: a reload can swap versions between requests.
    version: str | None = None

    def top(self, k: int) -> list[Prediction]:
        """The k best classes, best first; ties go to the lower index."""
        probs = self.probs
        k = max(1, min(k, probs.shape[0]))
        idx = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[0] else np.arange(probs.shape[0])
        order = sorted(idx.tolist(), key=lambda i: (-float(probs[i]), i))
        return [Prediction(i, self.labels[i], min(1.0, max(0.0, float(probs[i])))) for i in order]


class DataPlane:
    def __init__(self, settings: Settings, registry: Registry, metrics: Metrics, decode_pool: Executor) -> None:
        self.settings = settings
        self.registry = registry
        self.control = ModelControl(registry, metrics, settings.model_control, settings.poll_s)
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.stats = ServiceStats()
        self.memory = MemoryBudget(settings.max_inflight_bytes)
        self.draining = False
        # Requests admitted per model and not yet finished (uploading, decoding or queued).
        self.inflight: dict[str, int] = {}
        self.uploading = 0  # requests still sending their body, across models

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

    def is_ready(self, entry: ModelEntry) -> bool:
        return entry.status == "ready" and entry.batcher is not None and not self.draining

    def queue_drain_ms(self, entry: ModelEntry) -> float:
        """How long an image arriving now would wait before its inference starts, from the queue as it is."""
        b = entry.batcher
        return 0.0 if b is None else 1000.0 * b.queued * b.per_image_s

    # --- admission ---------------------------------------------------------------------
    def open(self, entry: ModelEntry, arrived: float | None = None, timeout_s: float | None = None) -> Call:
        """`timeout_s`: the client's own deadline from arrival, which can only shorten EFFNET_REQUEST_TIMEOUT_S."""
        loop_now = asyncio.get_running_loop().time()
        return Call(self, entry, loop_now if arrived is None else arrived, timeout_s)

    def check_admissible(self, entry: ModelEntry) -> None:
        """Ready and not draining: what can be decided without waiting."""
        # Draining first: once shutdown closes the registry every model also looks unavailable, and the
        # client must learn the real reason (retry elsewhere soon, not in 30 s).
        if self.draining:
            raise ShuttingDown("the server is shutting down", retry_after=5)
        if entry.status != "ready" or entry.batcher is None or entry.manifest is None:
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

    async def refusal(self, entry: ModelEntry) -> ApiError | None:
        """Stage one for a front end that has not routed the request yet: the refusal it would certainly
        get (draining, not ready, a queue that stays full for the admission wait), recorded; else None."""
        entry = self.current(entry)
        try:
            self.check_admissible(entry)
            await entry.batcher.room.wait_for_room(self.admission_wait_s(entry))
            return None
        except ApiError as exc:
            if isinstance(exc, Overloaded):
                self.stats.refused(entry.name)
                exc.headers = {**exc.headers, "Retry-After": str(self.retry_after_s(entry))}
            if exc.reject_reason:
                self.metrics.rejected.labels(entry.name, exc.reject_reason).inc()
            self.metrics.requests.labels(entry.name, str(exc.status)).inc()
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

    def _wait_left(self) -> float:
        now = asyncio.get_running_loop().time()
        return max(0.0, min(self._admit_by, self._deadline) - now)

    async def __aenter__(self) -> Call:
        plane, name = self.plane, self.entry.name
        plane.inflight[name] = plane.inflight.get(name, 0) + 1
        try:
            self.entry = plane.current(self.entry)
            plane.check_admissible(self.entry)
            # The admission gate (app/api/gate.py) has queued this request fairly already, if it could.
            await self.entry.batcher.room.wait_for_room(self._wait_left(), in_line=False)
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
                plane.metrics.rejected.labels(name, exc.reject_reason).inc()
            if isinstance(exc, Overloaded):
                plane.stats.refused(name)
                # When to come back: no sooner than the full queue would have drained.
                told = int(exc.headers.get("Retry-After", "1"))
                exc.headers = {**exc.headers, "Retry-After": str(max(told, plane.retry_after_s(self.entry)))}
        elif isinstance(exc, (ClientGone, asyncio.CancelledError)):
            status = "499"  # nginx's "client closed request": nobody reads the answer
        else:
            status = "500"
        plane.inflight[name] -= 1
        plane.metrics.requests.labels(name, status).inc()
        plane.metrics.request_duration.labels(name, status).observe(time.perf_counter() - self.started)

    def _check_count(self, n: int) -> None:
        limit = self.plane.settings.max_queue
        if n < 1:
            raise BadRequest("the request holds no image")
        if n > limit:  # could never be admitted: not worth a retry
            raise BadRequest(f"at most {limit} images per request")

    async def _reserve(self, n: int):
        # Reloaded while this request was being read: the old version takes no new work, its successor does.
        self.entry = self.plane.current(self.entry)
        tracing.annotate(images=n, version=self.entry.version)  # for the access log and the request span
        if self.entry.batcher is None:  # unloaded meanwhile
            self.plane.check_admissible(self.entry)
        return await self.entry.batcher.room.reserve_within(n, self._wait_left())

    def _skipped(self, n: int, why: str) -> None:
        self.plane.metrics.images_skipped.labels(self.entry.name, why).inc(n)

    async def images(self, data: list[bytes]) -> list[ImageResult]:
        """Encoded images -> answers, in order. Queue room for all of them is held before any is decoded."""
        self._check_count(len(data))
        loop = asyncio.get_running_loop()
        with await self._reserve(len(data)) as room:
            entry, plane = self.entry, self.plane  # after the reservation: a reload may have moved us on
            pp, max_pixels = entry.manifest.preprocess, plane.settings.max_image_pixels
            try:
                # One span for the request's images together: they decode in parallel, and each one's own
                # decode/preprocess times are in the answer and on /metrics already.
                with tracing.span("decode", model=entry.name, images=len(data)):
                    prepared: list[Prepared] = await asyncio.gather(*(
                        loop.run_in_executor(plane.decode_pool, functools.partial(
                            prepare, d, pp, max_pixels, budget=plane.memory)) for d in data
                    ))
            except asyncio.CancelledError:
                self._skipped(len(data), "client_gone")  # nothing of it reaches the model
                raise
            decode_hist = plane.metrics.stage_duration.labels(entry.name, "decode")
            pre_hist = plane.metrics.stage_duration.labels(entry.name, "preprocess")
            for p in prepared:
                decode_hist.observe(p.decode_s)
                pre_hist.observe(p.preprocess_s)
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
            submitted = tracing.now_ns()
            results = await room.submit(xs, self.arrived, self._timeout())
        tracing.batch_spans(submitted, results, model=self.entry.name, model_version=self.entry.version)
        return [self._result(r, 0.0, 0.0) for r in results]

    def _timeout(self) -> float:
        return self._deadline - self.arrived

    def _result(self, r: Result, decode_s: float, preprocess_s: float) -> ImageResult:
        return ImageResult(
            self.entry.name, r.probs, r.logits, self.entry.manifest.labels, decode_s, preprocess_s,
            r.queue_s, r.inference_s, r.batch_size, self.entry.version,
        )
