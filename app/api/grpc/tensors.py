"""ModelInferRequest -> what the data plane takes; answers -> ModelInferResponse. The V2 rules are codec.py's.

Inputs (exactly one), as on HTTP: FP32 `[N, 3, crop, crop]` or BYTES `[N]` / `[N, 1]` encoded images,
carried either in `raw_input_contents` (what tritonclient sends: little-endian FP32, or length-prefixed
BYTES elements) or in the input's typed `contents` (`fp32_contents`, `bytes_contents`); the same shape,
size and count checks as HTTP (codec.decode_input). Outputs: codec.requested_outputs decides which, and
the classification extension (`parameters["classification"]`, which tritonclient's `class_count=k` sends
as int64_param) turns the output into BYTES `[N, k]` "score:index:label". Every output travels in
`raw_output_contents`, since tritonclient reads FP32 answers from there alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from ..v2.codec import (
    VERSION, Output, classification_strings, decode_input, pack_bytes_elements, requested_outputs,
)
from ...core.errors import BadRequest
from ...engine.manifest import Manifest


@dataclass
class Parsed:
    tensors: list[np.ndarray] | None  # FP32 rows [3, crop, crop]
    images: list[bytes] | None  # encoded images
    outputs: list[Output]


def parameter(p: pb.InferParameter) -> Any:
    """The value of an InferParameter (whichever of its kinds is set), as JSON would have carried it."""
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind is not None else None


def parse_request(request: pb.ModelInferRequest, manifest: Manifest, max_images: int) -> Parsed:
    if len(request.inputs) != 1:
        raise BadRequest(f"model {manifest.name!r} takes exactly one input")
    t = request.inputs[0]
    if any(k.startswith("shared_memory") for k in t.parameters):
        raise BadRequest("shared-memory inputs are not supported")
    raw: bytes | None = None
    data: Any = None
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise BadRequest("raw_input_contents must hold one entry per input")
        if t.HasField("contents"):
            raise BadRequest(f"input {t.name!r}: both raw_input_contents and contents are set")
        raw = request.raw_input_contents[0]
    elif not t.HasField("contents"):
        raise BadRequest(f"input {t.name!r} has neither raw_input_contents nor contents")
    elif t.datatype == "BYTES":
        raw = pack_bytes_elements(t.contents.bytes_contents)  # one parser for both ways of sending BYTES
    elif t.datatype == "FP32":
        values = t.contents.fp32_contents
        data = np.fromiter(values, dtype=np.float32, count=len(values))
    outputs = requested_outputs(_outputs_as_json(request), manifest.onnx.output.name)
    tensors, images = decode_input(t.name, t.datatype, list(t.shape), raw, data, manifest, max_images)
    return Parsed(tensors, images, outputs)


def _outputs_as_json(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The requested outputs as the HTTP JSON header carries them, for codec.requested_outputs."""
    if not request.outputs:
        return {}
    return {"outputs": [{"name": o.name, "parameters": {k: parameter(v) for k, v in o.parameters.items()}}
                        for o in request.outputs]}


def encode_response(request_id: str, model: str, outputs: list[Output], labels: list[str], logits: np.ndarray,
                    probs: np.ndarray, version: str | None = None) -> pb.ModelInferResponse:
    # model_version: the version that computed the answer (as ModelMetadata lists it), "1" when unknown.
    resp = pb.ModelInferResponse(model_name=model, model_version=version or VERSION, id=request_id)
    n = logits.shape[0]
    for o in outputs:
        if o.class_count:
            strings = classification_strings(probs, labels, o.class_count)
            resp.outputs.add(name=o.name, datatype="BYTES", shape=[n, len(strings) // max(n, 1)])
            resp.raw_output_contents.append(pack_bytes_elements(s.encode() for s in strings))
        else:
            resp.outputs.add(name=o.name, datatype="FP32", shape=list(logits.shape))
            resp.raw_output_contents.append(logits.astype("<f4").tobytes())
    return resp
