"""The one inference path under every front end: admit, reserve, decode, submit, label.

Every way in (/classify, /v2 over HTTP and gRPC, cascades, `model=auto`) calls this module and only this
module to run a model, so admission, deadlines, metrics and latency samples are decided and recorded in
one place, in one unit:

    call = plane.open(entry, arrived)     # admitted, or refused at once (503/429): nothing read yet
    with call:
        images = await read_the_body()     # the front end's business
        results = await call.images(images)  # queue room for all of them, or none; decode off the loop

A `Call` counts as in flight from `open` until its `with` block ends; on the way out it records the
request's status and duration once, whatever happened inside (an answer, a refusal, a client that left).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from app.core.config import Settings
from app.core.errors import ApiError, BadRequest, ClientGone, Overloaded, ShuttingDown, Unavailable, UnknownModel
from app.engine.batcher import Result
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
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.stats = ServiceStats()
        self.draining = False
        # Requests admitted per model and not yet finished (uploading, decoding or queued).
        self.inflight: dict[str, int] = {}

    # --- which model -------------------------------------------------------------------
    def entry(self, name: str | None) -> ModelEntry:
        """The named model (the default one for None). No metric series for unknown names: they come
        from the client."""
        name = name if name is not None else self.registry.default_model
        entry = self.registry.entries.get(name) if name is not None else None
        if entry is None:
            raise UnknownModel("unknown model", available=self.registry.names())
        return entry

    def is_ready(self, entry: ModelEntry) -> bool:
        return entry.status == "ready" and entry.batcher is not None and not self.draining

    def queue_drain_ms(self, entry: ModelEntry) -> float:
        """How long an image arriving now would wait before its inference starts, from the queue as it is."""
        b = entry.batcher
        return 0.0 if b is None else 1000.0 * b.queued * b.per_image_s

    # --- admission ---------------------------------------------------------------------
    def open(self, entry: ModelEntry, arrived: float | None = None) -> Call:
        return Call(self, entry, asyncio.get_running_loop().time() if arrived is None else arrived)

    def check_admissible(self, entry: ModelEntry) -> None:
        """Ready, not draining, and under the per-model bound on requests in flight."""
        # Draining first: once shutdown closes the registry every model also looks unavailable, and the
        # client must learn the real reason (retry elsewhere soon, not in 30 s).
        if self.draining:
            raise ShuttingDown("the server is shutting down", retry_after=5)
        if entry.status != "ready" or entry.batcher is None or entry.manifest is None:
            if entry.status == "loading":
                raise Unavailable(f"model {entry.name!r} is still loading", retry_after=5)
            raise Unavailable(f"model {entry.name!r} is unavailable: {entry.reason}", retry_after=30, reason=entry.reason)
        if self.inflight.get(entry.name, 0) > self.settings.max_queue:
            raise Overloaded(f"model {entry.name!r} has {self.settings.max_queue} requests in flight; retry shortly")


class Call:
    """One request's use of one model. See the module docstring."""

    def __init__(self, plane: DataPlane, entry: ModelEntry, arrived: float) -> None:
        self.plane, self.entry, self.arrived = plane, entry, arrived
        self.started = time.perf_counter()

    def __enter__(self) -> Call:
        plane, name = self.plane, self.entry.name
        plane.inflight[name] = plane.inflight.get(name, 0) + 1
        try:
            plane.check_admissible(self.entry)
        except ApiError as exc:
            self._close(exc)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
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

    async def images(self, data: list[bytes]) -> list[ImageResult]:
        """Encoded images -> answers, in order. Queue room for all of them is held before any is decoded."""
        self._check_count(len(data))
        entry, plane = self.entry, self.plane
        pp, max_pixels = entry.manifest.preprocess, plane.settings.max_image_pixels
        loop = asyncio.get_running_loop()
        with entry.batcher.reserve(len(data)) as room:
            prepared: list[Prepared] = await asyncio.gather(
                *(loop.run_in_executor(plane.decode_pool, prepare, d, pp, max_pixels) for d in data)
            )
            decode_hist = plane.metrics.stage_duration.labels(entry.name, "decode")
            pre_hist = plane.metrics.stage_duration.labels(entry.name, "preprocess")
            for p in prepared:
                decode_hist.observe(p.decode_s)
                pre_hist.observe(p.preprocess_s)
            results = await room.submit([p.tensor for p in prepared], self.arrived)
        for p, r in zip(prepared, results):
            plane.stats.observe(entry.name, p.decode_s + p.preprocess_s + r.inference_s)
        return [self._result(r, p.decode_s, p.preprocess_s) for p, r in zip(prepared, results)]

    async def tensors(self, xs: list[np.ndarray]) -> list[ImageResult]:
        """Already-preprocessed [3, crop, crop] float32 tensors -> answers, in order."""
        self._check_count(len(xs))
        with self.entry.batcher.reserve(len(xs)) as room:
            results = await room.submit(xs, self.arrived)
        return [self._result(r, 0.0, 0.0) for r in results]

    def _result(self, r: Result, decode_s: float, preprocess_s: float) -> ImageResult:
        return ImageResult(
            self.entry.name, r.probs, r.logits, self.entry.manifest.labels, decode_s, preprocess_s,
            r.queue_s, r.inference_s, r.batch_size,
        )
