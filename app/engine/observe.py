"""The engine's one instrumentation interface: what happens to models, requests, batches and policies.

The engine reports events to an `Observer` and never touches Prometheus itself: `Metrics`
(app/engine/metrics.py) is the observer the service runs with, and `Observer()` itself, which ignores
everything, is what a batcher or a registry gets in a test that does not watch.

A model's batcher reports through `batches(name)`: a `BatchObserver` whose callables are bound to that model
once, when its batcher is made, because the batcher calls them for every image and batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .manifest import Manifest


def _ignore(*_: object) -> None:
    return None


@dataclass(frozen=True)
class BatchObserver:
    """One model's batcher events."""

    ran: Callable[[int, float], None] = _ignore  # a batch of n images ran, in s seconds
    queued: Callable[[float], None] = _ignore  # one image waited s seconds for its batch
    depth: Callable[[int], None] = _ignore  # images waiting for a batch now
    expired: Callable[[int], None] = _ignore  # images dropped: their deadline passed in the queue
    skipped: Callable[[int], None] = _ignore  # images dropped: their client left


class Observer:
    """Every event the engine reports, each ignored here; an implementation overrides what it records.

    Model names in these calls are always names the repository has (never a client's string), so an
    implementation may use them as labels."""

    # --- models ------------------------------------------------------------------------------
    def batches(self, model: str) -> BatchObserver:
        return BatchObserver()

    def model_serving(self, model: str, manifest: Manifest, provider: str) -> None:
        """A version of the model took traffic (a load, or a reload's swap)."""

    def model_stopped(self, model: str) -> None:
        """The model stopped taking traffic (unloaded, or about to be replaced)."""

    def load_finished(self, model: str, ok: bool, drift: bool) -> None:
        """A requested or polled (re)load ended; `drift`: it failed while an older version serves on."""

    def model_unloaded(self, model: str) -> None:
        """An unload (by request, or its folder gone) ended."""

    # --- requests ----------------------------------------------------------------------------
    def request_finished(self, model: str, status: str, seconds: float | None) -> None:
        """A request ended with this HTTP status; `seconds` from its admission, None when it was refused
        before it was admitted."""

    def request_refused(self, model: str, reason: str) -> None:
        """A request was refused for `reason` (a fixed vocabulary: app/core/errors.py reject_reason)."""

    def images_dropped(self, model: str, reason: str, n: int) -> None:
        """n admitted images were never run because their request ended first."""

    def image_prepared(self, model: str, decode_s: float, preprocess_s: float) -> None:
        """One image was decoded and preprocessed (by the engine, or by a worker process)."""

    # --- policies ------------------------------------------------------------------------------
    def auto_chose(self, model: str, budget_missed: bool) -> None:
        """model=auto chose `model`."""

    def escalated(self, cascade: str, from_model: str, to_model: str, n: int) -> None:
        """A cascade passed n images from one model to the next."""
