"""The Open Inference Protocol's (KServe V2) inference body: parsing requests, encoding answers.

No web framework here: bytes in, numpy and dataclasses out, and back. The HTTP routes (routes.py) and any
other transport use it alike.

Inputs (exactly one per request):
  * FP32 `[N, 3, crop, crop]`: already preprocessed (the manifest's resize/crop/normalise), as JSON
    `data` (flat row-major or nested) or binary;
  * BYTES `[N]` (or `[N, 1]`): encoded images (JPEG, PNG, ...), preprocessed by the server exactly like
    /classify. Binary (tritonclient's default: 4-byte little-endian length + bytes per element), or JSON
    `data` as base64 strings.
Outputs: the model's output (`logits`, FP32 `[N, 1000]`, raw logits). With the classification extension
(`parameters.classification: k` on the requested output, which is what tritonclient's
`InferRequestedOutput(..., class_count=k)` sends; `class_count` is accepted too) it is BYTES `[N, k]` of
`"score:index:label"`, best first, where score is the softmax probability (Triton puts the raw output
value there). Binary tensor data extension: request bodies with `Inference-Header-Content-Length`, and
binary outputs when asked for (`binary_data` on an output, or `binary_data_output` on the request).
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from ...core.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from ...engine.manifest import Manifest

VERSION = "1"
HEADER = "Inference-Header-Content-Length"


@dataclass
class Output:
    name: str
    class_count: int  # 0: the raw tensor; k: the classification extension's top k
    binary: bool


@dataclass
class InferInput:
    request: dict[str, Any]  # the JSON header, for the id and outputs
    tensors: list[np.ndarray] | None  # FP32 rows [3, crop, crop]
    images: list[bytes] | None  # BYTES elements: encoded images
    outputs: list[Output]


# Decompressed in pieces of this size, each charged to the memory budget before the next is made.
INFLATE_PIECE = 1 << 20
MAX_GZIP_MEMBERS = 64  # concatenated gzip members a body may hold (a writer appending streams makes a few)


class Charges(Protocol):
    """What decompression charges its output to: the request's share of the memory budget (app/api/body.py)."""

    def take(self, n: int, what: str) -> None: ...

    def give(self, n: int) -> None: ...


def decode_content(body: bytes, encoding: str | None, limit: int, budget: Charges | None = None) -> bytes:
    """The body with its Content-Encoding undone, within `limit` bytes. With a budget, the inflated bytes are
    charged like a plain body's before they are kept (a 3 kB gzip of a 3 MB tensor holds 3 MB), and the
    charge stays with the request (the budget gives it back when the request ends)."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    wbits = 31 if enc == "gzip" else 15
    d = zlib.decompressobj(wbits=wbits)
    pieces: list[bytes] = []
    total, rest, members = 0, body, 1
    try:
        while True:
            piece = d.decompress(rest, INFLATE_PIECE)
            rest = d.unconsumed_tail
            total += len(piece)
            if total > limit:
                raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes", limit_bytes=limit)
            if budget is not None:
                # Twice, as body.py charges a plain body: the pieces and the joined body are alive together.
                budget.take(2 * len(piece), "decompressed request bodies")
            pieces.append(piece)
            if d.eof:  # the stream's end, checksum read: the body ends here, or another gzip member follows
                if not d.unused_data:
                    break
                if enc != "gzip":
                    raise BadRequest("the body has data after the end of its deflate stream")
                members += 1
                if members > MAX_GZIP_MEMBERS:  # each costs a fresh inflater: bounded
                    raise BadRequest(f"the body has more than {MAX_GZIP_MEMBERS} gzip members")
                rest, d = d.unused_data, zlib.decompressobj(wbits=wbits)  # RFC 1952 2.2: one after another
            # A full piece may leave output inside zlib even with no input left: ask again until one is short.
            elif not rest and len(piece) < INFLATE_PIECE:
                raise BadRequest(f"the body is not valid {enc} data: it ends before its stream does")
    except zlib.error:
        raise BadRequest(f"the body is not valid {enc} data") from None
    out = b"".join(pieces)
    del pieces
    if budget is not None:
        budget.give(total)  # the pieces are gone: one copy stays charged
    return out


def _split(body: bytes, header_length: str | None, max_json: int) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER} is not a number") from None
        if not 0 <= n <= len(body):
            raise BadRequest(f"{HEADER} is {n}, the body has {len(body)} bytes")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    if len(head) > max_json:
        # Parsing JSON holds the GIL (about 9 ms a MB here, with orjson): a bigger header would stall every
        # other request. Big tensors belong in the binary extension, which tritonclient uses by default.
        raise PayloadTooLarge(f"the JSON part of the request is {len(head)} bytes; at most {max_json} "
                              "(EFFNET_MAX_JSON_MB); send large tensors as binary data", limit_bytes=max_json)
    try:
        req = orjson.loads(head)
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the inference request header is not valid JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise BadRequest("the inference request must be a JSON object with an 'inputs' list")
    return req, binary


def _shape(t: dict[str, Any]) -> list[int]:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input {t.get('name')!r}: 'shape' must be a list of non-negative integers")
    return shape


def bytes_elements(raw: bytes, where: str, expected: int) -> list[bytes]:
    """Length-prefixed BYTES elements; refused as soon as there are more than `expected`."""
    out: list[bytes] = []
    off = 0
    while off < len(raw):
        if len(out) == expected:
            raise BadRequest(f"{where}: more BYTES elements than its shape's {expected}")
        if off + 4 > len(raw):
            raise BadRequest(f"{where}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, off)
        off += 4
        if off + n > len(raw):
            raise BadRequest(f"{where}: BYTES element of {n} bytes runs past the data")
        out.append(raw[off:off + n])
        off += n
    return out


def pack_bytes_elements(elements) -> bytes:
    """BYTES elements as the binary form carries them: a 4-byte little-endian length before each."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _flatten(data: Any, limit: int, depth: int) -> list[Any]:
    """Nested JSON lists -> a flat list of at most `limit` values, nested at most `depth` lists deep. Every
    element counts, empty lists too: `[[],[],...]` holds no value, yet walking a million of them is work a
    4 kB gzip body could ask for. A well-formed `data` has a list around each group of values, so at most
    one list per value (and the outer one)."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    seen = 0
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            seen += 1
            if seen > 2 * limit:
                raise BadRequest(f"'data' holds more elements than the {limit} values its shape allows")
            if isinstance(item, list):
                if len(stack) >= depth:
                    raise BadRequest(f"'data' is nested deeper than its shape's {depth} dimensions")
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > limit:
                raise BadRequest(f"'data' holds more than the {limit} values its shape allows")
        else:
            stack.pop()
    return flat


def parse_infer(body: bytes, header_length: str | None, manifest: Manifest, max_images: int,
                max_json: int = 4 << 20) -> InferInput:
    req, binary = _split(body, header_length, max_json)
    inputs = req["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"model {manifest.name!r} takes exactly one input")
    t = inputs[0]
    name, dtype, shape = t.get("name"), t.get("datatype"), _shape(t)
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"input {name!r}: 'parameters' must be an object")
    if any(k.startswith("shared_memory") for k in params):
        raise BadRequest("shared-memory inputs are not supported")
    size = params.get("binary_data_size")
    raw = b""
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary)} binary bytes")
        raw = binary[:size]
    elif "data" not in t:
        raise BadRequest(f"input {name!r} has neither 'data' nor binary data")
    outputs = requested_outputs(req, manifest.onnx.output.name)
    tensors, images = decode_input(name, dtype, shape, raw if size is not None else None, t.get("data"),
                                   manifest, max_images)
    return InferInput(req, tensors, images, outputs)


def decode_input(name: Any, dtype: Any, shape: list[int], raw: bytes | None, data: Any, manifest: Manifest,
                 max_images: int) -> tuple[list[np.ndarray] | None, list[bytes] | None]:
    """The request's one input, whichever way it travelled: `raw` bytes (the binary extension, gRPC's
    raw_input_contents) or else `data` (JSON values, gRPC's typed contents), under the same shape, size
    and count rules on every transport. (FP32 rows [3, crop, crop], None) or (None, encoded images)."""
    shape = _shape({"name": name, "shape": shape})
    size = None if raw is None else len(raw)
    t = {"name": name, "data": data}
    if dtype == "FP32":
        return _fp32_rows(t, name, shape, size, raw or b"", manifest, max_images), None
    if dtype == "BYTES":
        return None, _images(t, name, shape, size, raw or b"", max_images)
    raise BadRequest(f"input {name!r}: datatype {dtype!r} is not supported; send FP32 tensors or BYTES images")


def _fp32_rows(t, name, shape, size, raw, manifest: Manifest, max_images: int) -> list[np.ndarray]:
    crop = manifest.preprocess.crop
    if name != manifest.onnx.input.name:
        raise BadRequest(f"model {manifest.name!r} has no input {name!r}; its input is {manifest.onnx.input.name!r}")
    if len(shape) != 4 or shape[1:] != [3, crop, crop] or shape[0] < 1:
        raise BadRequest(f"input {name!r}: shape {shape} is not [N, 3, {crop}, {crop}]")
    if shape[0] > max_images:
        raise BadRequest(f"at most {max_images} images per request")
    count = int(np.prod(shape))
    if size is not None:
        if size != count * 4:
            raise BadRequest(f"input {name!r}: {size} bytes of binary data for {count} FP32 values")
        x = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        numbers = BadRequest(f"input {name!r}: 'data' must hold numbers, flat or nested as its shape")
        try:  # nested as the shape, or flat: numpy walks it in C
            values = np.asarray(t["data"])
        except (TypeError, ValueError):
            raise numbers from None
        # Only numbers: asked for float32 straight away, numpy would turn a null into NaN (an answer of nulls,
        # with 200), read "1.5" as text into 1.5, and true as 1.
        if values.dtype.kind not in "iuf":
            raise numbers
        x = values.astype(np.float32).reshape(-1)
        if x.size != count:
            raise BadRequest(f"input {name!r}: {x.size} values in 'data' for shape {shape}")
    # NaN and infinities are passed on, as Triton does: perf_analyzer's default random input is arbitrary
    # bytes, and a row's values never reach another row of the batch (eval-mode networks are per-sample).
    x = x.reshape(shape)
    return [np.ascontiguousarray(row) for row in x]


def _images(t, name, shape, size, raw, max_images: int) -> list[bytes]:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise BadRequest(f"input {name!r}: BYTES input holds encoded images, shape [N] or [N, 1]; got {shape}")
    if shape[0] > max_images:
        raise BadRequest(f"at most {max_images} images per request")
    if size is not None:
        images = bytes_elements(raw, f"input {name!r}", shape[0])
    else:
        images = []
        for v in _flatten(t["data"], shape[0], 2):  # [N] or [N, 1], flat or nested
            if not isinstance(v, str):
                raise BadRequest(f"input {name!r}: JSON BYTES elements must be base64 strings")
            try:
                images.append(base64.b64decode(v, validate=True))
            except (binascii.Error, ValueError):
                raise BadRequest(f"input {name!r}: JSON BYTES elements must be base64-encoded images") from None
    if len(images) != shape[0]:
        raise BadRequest(f"input {name!r}: {len(images)} elements for shape {shape}")
    return images


def requested_outputs(req: dict[str, Any], output_name: str) -> list[Output]:
    params = req.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outs = req.get("outputs")
    if outs is None or outs == []:  # none asked for: every output, as over gRPC (where an empty list is no list)
        return [Output(output_name, 0, default_binary)]
    if not isinstance(outs, list):
        raise BadRequest("'outputs' must be a list")
    result: list[Output] = []
    for o in outs:
        if not isinstance(o, dict) or o.get("name") != output_name:
            got = o.get("name") if isinstance(o, dict) else o
            raise BadRequest(f"unknown output {got!r}; the model's output is {output_name!r}")
        if result:  # each entry is a copy of the answer: a 4 MB list of them would ask for gigabytes
            raise BadRequest(f"output {output_name!r} is requested more than once")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise BadRequest("output 'parameters' must be an object")
        if any(k.startswith("shared_memory") for k in p):
            raise BadRequest("shared-memory outputs are not supported")
        k = p.get("classification", p.get("class_count", 0))
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadRequest("the classification parameter must be a non-negative integer")
        result.append(Output(output_name, k, bool(p.get("binary_data", default_binary))))
    return result


def classification_strings(probs: np.ndarray, labels: list[str], k: int) -> list[str]:
    """Triton's classification extension: per row, the k best as "score:index:label", flattened."""
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [f"{probs[r, i]:.6f}:{i}:{labels[i]}" for r in range(probs.shape[0]) for i in idx[r]]


def encode_infer(inp: InferInput, model: str, labels: list[str], logits: np.ndarray,
                 probs: np.ndarray, version: str | None = None) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the answer; binary outputs follow the JSON header, as the extension says.
    `version`: the model version that computed it (what /v2/models/{m} lists), "1" when unknown."""
    out_json: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    n = logits.shape[0]
    for o in inp.outputs:
        if o.class_count:
            strings = classification_strings(probs, labels, o.class_count)
            t: dict[str, Any] = {"name": o.name, "datatype": "BYTES", "shape": [n, len(strings) // max(n, 1)]}
            if o.binary:
                raw = pack_bytes_elements(s.encode() for s in strings)
                t["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                t["data"] = strings
        else:
            t = {"name": o.name, "datatype": "FP32", "shape": list(logits.shape)}
            if o.binary:
                raw = logits.astype("<f4").tobytes()
                t["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                t["data"] = logits.astype(np.float32).ravel()  # orjson writes the array itself
        out_json.append(t)
    resp: dict[str, Any] = {"model_name": model, "model_version": version or VERSION, "outputs": out_json}
    if isinstance(inp.request.get("id"), str):
        resp["id"] = inp.request["id"]
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {"content-type": "application/octet-stream", HEADER: str(len(head))}
