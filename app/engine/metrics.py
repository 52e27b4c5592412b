"""Prometheus metrics (names fixed by the observability issue), one registry per app.

Label values come only from the names of models the repository has (a load of a name it lacks records
nothing: registry.NoSuchModel), from configuration, and from our own fixed vocabularies (status codes,
stages, reasons), never from the request, so no client can mint series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported

from .manifest import Manifest
from .observe import BatchObserver, Observer

# ~1 ms (a B0 batch on a GPU) to ~10 s (a queued B7 on a CPU), roughly x2 per step.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics(Observer):
    """The service's observer: every engine event as a Prometheus series."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_duration = Histogram(
            "effnet_request_duration_seconds", "End-to-end /classify handling time",
            ["model", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.stage_duration = Histogram(
            "effnet_stage_duration_seconds", "Time each image spent in each stage",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "effnet_batch_size", "Images per inference run (before padding)", ["model"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("effnet_queue_depth", "Images waiting for a batch", ["model"], registry=r)
        self.requests = Counter("effnet_requests", "Classification requests by HTTP status", ["model", "status"], registry=r)
        self.rejected = Counter("effnet_requests_rejected", "Requests refused, by reason", ["model", "reason"], registry=r)
        self.images_skipped = Counter(
            "effnet_images_skipped", "Images admitted but never run because the request ended first, by why",
            ["model", "reason"], registry=r,
        )
        self.model_info = Gauge(
            "effnet_model_info", "Loaded model (always 1)", ["model", "provider", "pretrained", "resolution"], registry=r,
        )
        self.model_macs = Gauge("effnet_model_macs", "Multiply-adds per image", ["model"], registry=r)
        self.model_params = Gauge("effnet_model_params", "Parameter count", ["model"], registry=r)
        self.model_accuracy = Gauge(
            "effnet_model_accuracy", "ImageNet accuracy in percent", ["model", "metric", "source"], registry=r,
        )
        # Family features (app/policies/routing.py, cascade.py). `cascade` is the configured EFFNET_DEFAULT_CASCADE
        # or "cascade" for any other (cascade_label): the orderings a client may ask for would mint series.
        self.cascade_escalations = Counter(
            "effnet_cascade_escalations", "Images a cascade passed on to its next model",
            ["cascade", "from_model", "to_model"], registry=r,
        )
        self.auto_routed = Counter(
            "effnet_auto_routed", "model=auto requests by the model chosen", ["model", "budget_missed"], registry=r,
        )
        # Model control (the V2 repository extension, EFFNET_MODEL_CONTROL=poll): names of model folders only.
        self.model_loads = Counter(
            "effnet_model_loads", "Model loads and reloads, by outcome (ok, failed)", ["model", "outcome"], registry=r,
        )
        self.model_unloads = Counter("effnet_model_unloads", "Models unloaded", ["model"], registry=r)
        self.model_reload_failures = Counter(
            "effnet_model_reload_failures", "Reloads that failed while the previous version kept serving",
            ["model"], registry=r,
        )
        self.model_disk_drift = Gauge(
            "effnet_model_disk_drift", "1 while the model's files on disk failed to load and an older version serves",
            ["model"], registry=r,
        )
        self.model_version = Gauge(
            "effnet_model_version_info", "The version serving (always 1)", ["model", "version"], registry=r,
        )
        self._info_labels: dict[str, tuple] = {}  # the current info series per model, to drop on change

    # --- Observer ----------------------------------------------------------------------------
    def model_serving(self, name: str, manifest: Manifest, provider: str) -> None:
        self.model_stopped(name)  # a reload may change any label
        info = (name, provider, str(manifest.weights.pretrained).lower(), str(manifest.resolution))
        version = (name, manifest.onnx.sha256[:12])
        self.model_info.labels(*info).set(1)
        self.model_version.labels(*version).set(1)
        self._info_labels[name] = (info, version)
        self.model_macs.labels(name).set(manifest.macs)
        self.model_params.labels(name).set(manifest.params)
        for source in ("reference", "measured"):
            acc = getattr(manifest.accuracy, source)
            if acc is None:
                continue
            for metric in ("top1", "top5"):
                value = getattr(acc, metric)
                if value is not None:
                    self.model_accuracy.labels(name, metric, source).set(value)
        self.queue_depth.labels(name).set(0)

    def model_stopped(self, name: str) -> None:
        """The model no longer serves (unloaded, or about to be replaced): its info series go."""
        labels = self._info_labels.pop(name, None)
        if labels is not None:
            self.model_info.remove(*labels[0])
            self.model_version.remove(*labels[1])

    def batches(self, name: str) -> BatchObserver:
        batch = self.batch_size.labels(name)
        inference = self.stage_duration.labels(name, "inference")
        queue = self.stage_duration.labels(name, "queue")
        depth = self.queue_depth.labels(name)

        def ran(size: int, seconds: float) -> None:
            batch.observe(size)
            for _ in range(size):  # per image, like the other stages: each waited the whole run
                inference.observe(seconds)

        # Expired items are counted as rejections by the handler that receives the error.
        gone = self.images_skipped.labels(name, "client_gone")
        return BatchObserver(ran=ran, queued=queue.observe, depth=depth.set, skipped=gone.inc)

    def load_finished(self, name: str, ok: bool, drift: bool) -> None:
        self.model_loads.labels(name, "ok" if ok else "failed").inc()
        if ok:
            self.model_disk_drift.labels(name).set(0)
        elif drift:  # the old version serves on
            self.model_reload_failures.labels(name).inc()
            self.model_disk_drift.labels(name).set(1)

    def model_unloaded(self, name: str) -> None:
        self.model_unloads.labels(name).inc()
        self.model_disk_drift.labels(name).set(0)  # what is on disk no longer matters

    def request_finished(self, name: str, status: str, seconds: float | None) -> None:
        self.requests.labels(name, status).inc()
        if seconds is not None:
            self.request_duration.labels(name, status).observe(seconds)

    def request_refused(self, name: str, reason: str) -> None:
        self.rejected.labels(name, reason).inc()

    def images_dropped(self, name: str, reason: str, n: int) -> None:
        self.images_skipped.labels(name, reason).inc(n)

    def image_prepared(self, name: str, decode_s: float, preprocess_s: float) -> None:
        self.stage_duration.labels(name, "decode").observe(decode_s)
        self.stage_duration.labels(name, "preprocess").observe(preprocess_s)

    def auto_chose(self, name: str, budget_missed: bool) -> None:
        self.auto_routed.labels(name, str(budget_missed).lower()).inc()

    def escalated(self, cascade: str, from_model: str, to_model: str, n: int) -> None:
        self.cascade_escalations.labels(cascade, from_model, to_model).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
