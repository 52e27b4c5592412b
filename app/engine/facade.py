"""What a front end may know about the engine: plain, picklable snapshots, and the verbs that produce them.

Front ends (HTTP, gRPC, the policies) hold a `Plane`: in one process it is the engine's own `DataPlane`
(app/engine/dataplane.py); in a worker process it is a client that asks the engine process the same
questions over a socket (app/engine/link). Either way a front end sees models only as `ModelView`s,
snapshots that carry no live object (no session, no batcher, no queue), so they cross a process boundary
as they are and cannot be used to reach around admission.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..core.config import Settings
from ..core.errors import Unavailable
from .manifest import Manifest
from .memory import MemoryBudget, UploadCount

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
    pretrained: bool = False  # the weights are real (from the manifest), not random
    provider: str | None = None  # the ONNX Runtime execution provider that ran it (CPU, CUDA, TensorRT)

    def top(self, k: int) -> list[Prediction]:
        """The k best classes, best first; ties go to the lower index."""
        probs = self.probs
        k = max(1, min(k, probs.shape[0]))
        idx = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[0] else np.arange(probs.shape[0])
        order = sorted(idx.tolist(), key=lambda i: (-float(probs[i]), i))
        return [Prediction(i, self.labels[i], min(1.0, max(0.0, float(probs[i])))) for i in order]


def index_state(status: str) -> str:
    """A model's status as the V2 repository index names it."""
    return {"ready": "READY", "loading": "LOADING"}.get(status, "UNAVAILABLE")


def loaded_manifest(name: str, manifest: Manifest | None) -> Manifest:
    """A model's manifest, or 503 for a model unloaded meanwhile (ModelView.spec, registry.ModelEntry.spec)."""
    if manifest is None:
        raise Unavailable(f"model {name} is not loaded")
    return manifest


@dataclass(frozen=True)
class ModelView:
    """One model as the front ends see it at one moment."""

    name: str
    status: str  # "loading", "ready" or "unavailable"
    reason: str | None = None
    version: str | None = None  # the first 12 hex digits of the ONNX file's sha256
    manifest: Manifest | None = None
    provider: str | None = None  # the ONNX Runtime execution provider that runs it
    max_batch: int | None = None
    batch_sizes: tuple[int, ...] | None = None  # the batch shapes it runs; None unless it serves
    drift: str | None = None  # serving, but its files on disk failed to load: why (registry.ModelEntry.drift)
    revision: int | None = None  # which load of the model (registry.ModelEntry.revision): the same version may
    # come back with another manifest

    @property
    def spec(self) -> Manifest:
        """The manifest of a version that loaded: every view a call holds has one."""
        return loaded_manifest(self.name, self.manifest)

    @property
    def serving(self) -> bool:
        """Loaded and taking work (it may still refuse a request when its queue is full)."""
        return self.status == "ready" and self.batch_sizes is not None and self.manifest is not None


@dataclass(frozen=True)
class Readiness:
    """What /health/ready, V2 ServerReady and the gRPC probe answer from."""

    ready: bool
    draining: bool
    models: tuple[str, ...]  # every configured model, in order
    serving: tuple[str, ...]
    not_ready: dict[str, str] = field(default_factory=dict)  # should serve and does not: name -> why


@dataclass(frozen=True)
class RouteInfo:
    """What `model=auto` prices a model by (app/policies/routing.py)."""

    queue_drain_ms: float  # how long an image arriving now would wait for its inference to start
    p95_ms: float | None  # recent per-image service time, None until there are enough samples
    samples: int  # how many recent samples p95_ms is over
    recently_refused: bool  # its queue refused a request a moment ago
    p50_ms: float | None = None  # the same samples' median: what the page at / shows (app/api/models.py)


class Call(Protocol):
    """One request's use of one model: an async context manager (admitted on entry), then one of:"""

    view: ModelView

    async def images(self, data: list[bytes]) -> list[ImageResult]: ...

    async def tensors(self, xs: list[Any]) -> list[ImageResult]: ...


class Plane(Protocol):
    """The verbs every front end uses, and nothing else (see the module docstring)."""

    settings: Settings
    memory: MemoryBudget  # bytes of bodies and pixels in flight (across workers: a SharedBudget)
    decode_pool: Executor  # the threads that decode, preprocess and parse, off the event loop
    uploads: UploadCount  # requests still sending their body (across workers: a SharedUploadCount)

    @property
    def draining(self) -> bool: ...

    @draining.setter
    def draining(self, value: bool) -> None: ...  # set when the front end starts to shut down

    def find(self, name: str | None) -> ModelView: ...

    def views(self) -> list[ModelView]: ...

    def default_model(self) -> str | None: ...

    def readiness(self) -> Readiness: ...

    def open(self, view: ModelView, arrived: float | None = None, timeout_s: float | None = None) -> Any: ...

    async def refusal(self, view: ModelView) -> Any: ...

    async def route_info(self) -> dict[str, RouteInfo]: ...

    async def index(self) -> list[dict[str, str]]: ...

    async def load(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...

    def note_auto_routed(self, name: str, budget_missed: bool) -> None: ...

    def note_escalations(self, cascade: str, from_model: str, to_model: str, n: int) -> None: ...

    async def metrics_text(self) -> bytes: ...

