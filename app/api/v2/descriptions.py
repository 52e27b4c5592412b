"""What the V2 protocol says about the server and its models, whatever the transport (HTTP routes.py, gRPC
app/api/grpc): server metadata, the model lookup with its version rule, model metadata, Triton's model
configuration. Plain dicts, no web framework."""

from __future__ import annotations

from typing import Any

from ... import __version__
from .codec import VERSION
from ...core.errors import UnknownModel
from ...engine.facade import ModelView, Plane, index_state

SERVER_NAME = "effnet-serve"
PLATFORM = "onnxruntime_onnx"
# Not "statistics": perf_analyzer polls /v2/models/{m}/stats when a server lists it.
EXTENSIONS = ["classification", "binary_tensor_data", "model_repository", "model_configuration"]


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


def find_entry(plane: Plane, name: str, version: str | None) -> ModelView:
    """The named model, or UnknownModel (404): a model it does not have, or a version it does not serve."""
    try:
        entry = plane.find(name)
    except UnknownModel as exc:
        # The name came from the client: not echoed back.
        raise UnknownModel(f"unknown model; available: {', '.join(exc.extra.get('available', []))}") from None
    if version not in (None, "", VERSION, entry.version):
        # "1" stays accepted: before versions followed the ONNX file, every model was version 1.
        raise UnknownModel(f"model {name!r} serves version {entry.version or VERSION} only")
    return entry


def metadata(entry: ModelView) -> dict[str, Any]:
    m = entry.manifest
    out: dict[str, Any] = {"name": entry.name, "versions": [entry.version or VERSION], "platform": PLATFORM}
    if m is not None:
        crop = m.preprocess.crop
        out["inputs"] = [{"name": m.onnx.input.name, "datatype": "FP32", "shape": [-1, 3, crop, crop]}]
        out["outputs"] = [{"name": m.onnx.output.name, "datatype": "FP32", "shape": [-1, len(m.labels)]}]
    else:  # not loaded: the manifest could not be read; say what we know
        out["inputs"], out["outputs"] = [], []
    return out


def model_state(entry: ModelView) -> dict[str, Any]:
    """The state the repository index gives the model (READY, LOADING, UNAVAILABLE), and the reason when there is
    one: why it does not serve, or, while it serves, why its files on disk failed to load. HTTP only: gRPC's
    ModelMetadataResponse has no such fields (RepositoryIndex carries them there)."""
    out: dict[str, Any] = {"state": index_state(entry.status)}
    if entry.reason or entry.drift:
        out["reason"] = entry.reason or entry.drift
    return out


def model_config(entry: ModelView, plane: Plane) -> dict[str, Any]:
    """Triton's model configuration (the fields perf_analyzer and Triton clients read); dims leave out the
    batch axis, as Triton's do."""
    m = entry.manifest
    out: dict[str, Any] = {"name": entry.name, "platform": PLATFORM, "backend": "onnxruntime",
                           "max_batch_size": entry.max_batch or 0}
    if m is not None:
        crop = m.preprocess.crop
        out["input"] = [{"name": m.onnx.input.name, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                         "dims": [3, crop, crop]}]
        out["output"] = [{"name": m.onnx.output.name, "data_type": "TYPE_FP32", "dims": [len(m.labels)]}]
    out["dynamic_batching"] = {"max_queue_delay_microseconds": int(plane.settings.max_delay_ms * 1000)}
    if entry.batch_sizes is not None:
        out["dynamic_batching"]["preferred_batch_size"] = list(entry.batch_sizes)
    out["version_policy"] = {"latest": {"num_versions": 1}}
    return out
