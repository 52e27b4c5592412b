"""Open Inference Protocol (KServe V2) over HTTP, as tritonclient and the KServe SDK speak it.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    200 / 503
    GET  /v2/models/{m}[/versions/1]           model metadata
    GET  /v2/models/{m}[/versions/1]/ready     200 / 503 (404: no such model)
    POST /v2/models/{m}[/versions/1]/infer     inference

Inputs (exactly one per request):
  * FP32 `[N, 3, crop, crop]`: already preprocessed (the manifest's resize/crop/normalise),
    as JSON `data` (flat row-major or nested) or binary;
  * BYTES `[N]` (or `[N, 1]`): encoded images (JPEG, PNG, ...), preprocessed here exactly
    like /classify. Binary (tritonclient's default: 4-byte little-endian length + bytes per
    element), or JSON `data` as base64 strings.
Outputs: the model's output (`logits`, FP32 `[N, 1000]`, raw logits). With the
classification extension (`parameters.classification: k` on the requested output, which is
what tritonclient's `InferRequestedOutput(..., class_count=k)` sends; `class_count` is
accepted too) it is BYTES `[N, k]` of `"score:index:label"`, best first, where score is the
softmax probability (Triton puts the raw output value there).
Binary tensor data extension: request bodies with `Inference-Header-Content-Length`, and
binary outputs when asked for (`binary_data` on an output, or `binary_data_output` on the
request, as tritonclient does by default). Request `Content-Encoding: gzip|deflate` is
accepted within the body limit.

Every request goes through the model's batcher, like /classify, and is counted in the same
metrics. Errors are the protocol's shape, `{"error": "message"}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import struct
import time
import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app import __version__
from app.errors import (
    ApiError,
    PayloadTooLarge,
)
from app.registry import ModelEntry

VERSION = "1"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["classification", "binary_tensor_data"]
HEADER = "Inference-Header-Content-Length"

class ProtocolErrorBody(BaseModel):
    error: str


def _documented(**codes: str) -> dict[int | str, dict[str, Any]]:
    return {int(c[1:]): {"model": ProtocolErrorBody, "description": d} for c, d in codes.items()}


# Declared on the router so every /v2 route's OpenAPI lists the errors it can answer with
# (schemathesis holds the service to its own spec).
router = APIRouter(
    prefix="/v2",
    tags=["Open Inference Protocol (KServe V2)"],
    responses=_documented(
        s400="malformed inference request (header, shapes, data, binary sizes)",
        s401="EFFNET_API_KEY is set and the request lacks it",
        s404="unknown model or version",
        s413="body larger than EFFNET_MAX_BODY_MB",
        s415="unsupported Content-Encoding",
        s503="model loading, unavailable, overloaded or shutting down; see Retry-After",
    ),
)


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _state(request: Request):
    from app.routes import state_of

    return state_of(request)


def ensure_admissible(st, entry: ModelEntry) -> None:
    from app.routes import ensure_admissible as check  # app.routes imports this module's siblings

    check(st, entry)


def _entry(request: Request, name: str, version: str | None) -> ModelEntry:
    st = _state(request)
    entry = st.registry.entries.get(name)
    if entry is None:
        # The name came from the client: not echoed back.
        raise ProtocolError(404, f"unknown model; available: {', '.join(st.registry.names())}")
    if version not in (None, "", VERSION):
        raise ProtocolError(404, f"model {name!r} has only version {VERSION}")
    return entry


# --- server -----------------------------------------------------------------------------
@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "effnet-serve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The process is up")
async def health_live() -> dict[str, Any]:
    return {"live": True}


@router.get("/health/ready", summary="Every configured model is loaded and warmed")
async def health_ready(request: Request) -> JSONResponse:
    st = _state(request)
    ready = st.registry.ready and not st.draining
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


# --- models -----------------------------------------------------------------------------
def _metadata(entry: ModelEntry) -> dict[str, Any]:
    m = entry.manifest
    out: dict[str, Any] = {"name": entry.name, "versions": [VERSION], "platform": PLATFORM}
    if m is not None:
        crop = m.preprocess.crop
        out["inputs"] = [{"name": m.onnx.input.name, "datatype": "FP32", "shape": [-1, 3, crop, crop]}]
        out["outputs"] = [{"name": m.onnx.output.name, "datatype": "FP32", "shape": [-1, len(m.labels)]}]
    else:  # not loaded: the manifest could not be read; say what we know
        out["inputs"], out["outputs"] = [], []
    return out


async def _model_metadata(request: Request, name: str, version: str | None) -> JSONResponse:
    try:
        return JSONResponse(_metadata(_entry(request, name, version)))
    except ProtocolError as exc:
        return _error(exc.status, exc.message)


async def _model_ready(request: Request, name: str, version: str | None) -> JSONResponse:
    try:
        entry = _entry(request, name, version)
    except ProtocolError as exc:
        return _error(exc.status, exc.message)
    ready = entry.status == "ready" and entry.batcher is not None and not _state(request).draining
    return JSONResponse({"name": entry.name, "ready": ready}, status_code=200 if ready else 503)


@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(request: Request, name: str) -> JSONResponse:
    return await _model_metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)")
async def model_version_metadata(request: Request, name: str, version: str) -> JSONResponse:
    return await _model_metadata(request, name, version)


@router.get("/models/{name}/ready", summary="Model readiness")
async def model_ready(request: Request, name: str) -> JSONResponse:
    return await _model_ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (one version)")
async def model_version_ready(request: Request, name: str, version: str) -> JSONResponse:
    return await _model_ready(request, name, version)


# --- inference --------------------------------------------------------------------------
@router.post("/models/{name}/infer", summary="Inference")
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)")
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    from app.uploads import ClientGone, read_body

    st = _state(request)
    started = time.perf_counter()
    arrived = asyncio.get_running_loop().time()
    try:
        entry = _entry(request, name, version)
    except ProtocolError as exc:
        return _error(exc.status, exc.message)
    status = "500"
    st.inflight[name] = st.inflight.get(name, 0) + 1
    try:
        ensure_admissible(st, entry)
        body = await read_body(request, st.settings.max_body_bytes)
        body = _decode_content(body, request.headers.get("content-encoding"), st.settings.max_body_bytes)
        resp, is_image = await _run(st, entry, request, body, arrived)
        status = "200"
        if is_image:  # encoded images: comparable with /classify for model=auto's statistics
            fam = getattr(request.app.state, "family", None)
            if fam is not None:
                fam.latency.observe(name, time.perf_counter() - started)
        return resp
    except ProtocolError as exc:
        status = str(exc.status)
        st.metrics.rejected.labels(name, "bad_request").inc()
        return _error(exc.status, exc.message, exc.headers)
    except ApiError as exc:
        status = str(exc.status)
        if exc.reject_reason:
            st.metrics.rejected.labels(name, exc.reject_reason).inc()
        return _error(exc.status, exc.message, exc.headers)
    except ClientGone:
        status = "499"
        return Response(status_code=499)
    finally:
        st.inflight[name] -= 1
        st.metrics.requests.labels(name, status).inc()
        st.metrics.request_duration.labels(name, status).observe(time.perf_counter() - started)


def _decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise ProtocolError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        raise ProtocolError(400, f"the body is not valid {enc} data") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes", limit_bytes=limit)
    return out


def _parse_request(request: Request, body: bytes) -> tuple[dict[str, Any], bytes]:
    header = request.headers.get(HEADER)
    if header is not None:
        try:
            n = int(header)
        except ValueError:
            raise ProtocolError(400, f"{HEADER} is not a number") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(400, f"{HEADER} is {n}, the body has {len(body)} bytes")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(400, "the inference request header is not valid JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ProtocolError(400, "the inference request must be a JSON object with an 'inputs' list")
    return req, binary


def _shape(t: dict[str, Any]) -> list[int]:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(400, f"input {t.get('name')!r}: 'shape' must be a list of non-negative integers")
    return shape


def _bytes_elements(raw: bytes, where: str) -> list[bytes]:
    out, off = [], 0
    while off < len(raw):
        if off + 4 > len(raw):
            raise ProtocolError(400, f"{where}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, off)
        off += 4
        if off + n > len(raw):
            raise ProtocolError(400, f"{where}: BYTES element of {n} bytes runs past the data")
        out.append(raw[off:off + n])
        off += n
    return out


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        flat: list[Any] = []
        stack = [iter(data)]
        while stack:
            for item in stack[-1]:
                if isinstance(item, list):
                    stack.append(iter(item))
                    break
                flat.append(item)
            else:
                stack.pop()
        return flat
    return [data]


async def _run(st, entry: ModelEntry, request: Request, body: bytes, arrived: float) -> tuple[Response, bool]:
    from app.preprocess import prepare

    m = entry.manifest
    assert m is not None and entry.batcher is not None
    req, binary = _parse_request(request, body)
    inputs = req["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, f"model {entry.name!r} takes exactly one input")
    t = inputs[0]
    name, dtype, shape = t.get("name"), t.get("datatype"), _shape(t)
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, f"input {name!r}: 'parameters' must be an object")
    if any(k.startswith("shared_memory") for k in params):
        raise ProtocolError(400, "shared-memory inputs are not supported")
    size = params.get("binary_data_size")
    raw = b""
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise ProtocolError(400, f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary)} binary bytes")
        raw = binary[:size]
    elif "data" not in t:
        raise ProtocolError(400, f"input {name!r} has neither 'data' nor binary data")
    max_n = st.settings.max_queue
    crop = m.preprocess.crop

    if dtype == "FP32":
        if name != m.onnx.input.name:
            raise ProtocolError(400, f"model {entry.name!r} has no input {name!r}; its input is {m.onnx.input.name!r}")
        if len(shape) != 4 or shape[1:] != [3, crop, crop] or shape[0] < 1:
            raise ProtocolError(400, f"input {name!r}: shape {shape} is not [N, 3, {crop}, {crop}]")
        if shape[0] > max_n:
            raise ProtocolError(400, f"at most {max_n} images per request")
        count = int(np.prod(shape))
        if size is not None:
            if size != count * 4:
                raise ProtocolError(400, f"input {name!r}: {size} bytes of binary data for {count} FP32 values")
            x = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            try:
                x = np.asarray(_flatten(t["data"]), dtype=np.float32)
            except (TypeError, ValueError):
                raise ProtocolError(400, f"input {name!r}: 'data' must hold numbers") from None
            if x.size != count:
                raise ProtocolError(400, f"input {name!r}: {x.size} values in 'data' for shape {shape}")
        x = x.reshape(shape)
        if not np.isfinite(x).all():
            raise ProtocolError(400, f"input {name!r} holds NaN or infinite values")
        tensors = [np.ascontiguousarray(row) for row in x]
        is_image = False
    elif dtype == "BYTES":
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise ProtocolError(400, f"input {name!r}: BYTES input holds encoded images, shape [N] or [N, 1]; got {shape}")
        if shape[0] > max_n:
            raise ProtocolError(400, f"at most {max_n} images per request")
        if size is not None:
            images = _bytes_elements(raw, f"input {name!r}")
        else:
            images = []
            for v in _flatten(t["data"]):
                if not isinstance(v, str):
                    raise ProtocolError(400, f"input {name!r}: JSON BYTES elements must be base64 strings")
                try:
                    images.append(base64.b64decode(v, validate=True))
                except (binascii.Error, ValueError):
                    raise ProtocolError(400, f"input {name!r}: JSON BYTES elements must be base64-encoded images") from None
        if len(images) != shape[0]:
            raise ProtocolError(400, f"input {name!r}: {len(images)} elements for shape {shape}")
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(st.decode_pool, prepare, d, m.preprocess, st.settings.max_image_pixels) for d in images)
        )
        decode_hist = st.metrics.stage_duration.labels(entry.name, "decode")
        pre_hist = st.metrics.stage_duration.labels(entry.name, "preprocess")
        for p in prepared:
            decode_hist.observe(p.decode_s)
            pre_hist.observe(p.preprocess_s)
        tensors = [p.tensor for p in prepared]
        is_image = True
    else:
        raise ProtocolError(400, f"input {name!r}: datatype {dtype!r} is not supported; send FP32 tensors or BYTES images")

    outputs = _requested_outputs(req, m.onnx.output.name)
    results = await entry.batcher.submit(tensors, arrived)
    logits = np.stack([r.logits if r.logits is not None else np.log(np.maximum(r.probs, 1e-45)) for r in results])
    probs = np.stack([r.probs for r in results])
    return _respond(req, entry, outputs, logits, probs), is_image


def _requested_outputs(req: dict[str, Any], output_name: str) -> list[tuple[str, int, bool]]:
    """[(name, class_count, binary)] for each requested output."""
    params = req.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outs = req.get("outputs")
    if outs is None:
        return [(output_name, 0, default_binary)]
    if not isinstance(outs, list) or not outs:
        raise ProtocolError(400, "'outputs' must be a non-empty list")
    result = []
    for o in outs:
        if not isinstance(o, dict) or o.get("name") != output_name:
            got = o.get("name") if isinstance(o, dict) else o
            raise ProtocolError(400, f"unknown output {got!r}; the model's output is {output_name!r}")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise ProtocolError(400, "output 'parameters' must be an object")
        if any(k.startswith("shared_memory") for k in p):
            raise ProtocolError(400, "shared-memory outputs are not supported")
        k = p.get("classification", p.get("class_count", 0))
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ProtocolError(400, "the classification parameter must be a non-negative integer")
        result.append((output_name, k, bool(p.get("binary_data", default_binary))))
    return result


def _respond(req: dict[str, Any], entry: ModelEntry, outputs, logits: np.ndarray, probs: np.ndarray) -> Response:
    labels = entry.manifest.labels
    out_json: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    n = logits.shape[0]
    for name, k, binary in outputs:
        if k:
            k = min(k, probs.shape[1])
            idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            strings = [f"{probs[r, i]:.6f}:{i}:{labels[i]}" for r in range(n) for i in idx[r]]
            t: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": [n, k]}
            if binary:
                raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in strings)
                t["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                t["data"] = strings
        else:
            t = {"name": name, "datatype": "FP32", "shape": list(logits.shape)}
            if binary:
                raw = logits.astype("<f4").tobytes()
                t["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                t["data"] = logits.astype(np.float32).ravel().tolist()
        out_json.append(t)
    resp: dict[str, Any] = {"model_name": entry.name, "model_version": VERSION, "outputs": out_json}
    if "id" in req and isinstance(req["id"], str):
        resp["id"] = req["id"]
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(chunks), media_type="application/octet-stream", headers={HEADER: str(len(head))},
    )


@router.api_route("/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
async def not_found(rest: str) -> JSONResponse:
    return _error(404, f"no such endpoint: /v2/{rest}")
