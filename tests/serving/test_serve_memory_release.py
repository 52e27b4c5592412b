"""The memory budget (app/engine/memory.py) goes back to 0 after every way a request can end.

Each request's bytes (its body as it arrives, its decoded pixels, a gRPC message) are charged to the data
plane's budget and must be given back whatever happens: an answer, 413, 408, a 503 refusal (budget full, queue
full), a client that leaves while uploading, while its image waits to be decoded or while it waits for
inference, and the same over gRPC. The server runs in-process, so the test reads the budget itself
(`plane.memory`); `peak > 0` shows that the request really was charged, `used == 0` afterwards that it was all
given back. Waits are polls on the server's own state with a generous deadline, never sleeps.

Where a request must be caught in the middle, the test holds the server's own resource it is waiting for
(the decode pool's one thread, the model's inference thread) with an Event, so the timing is decided by the
test, not by the machine's speed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from raw_http import HeldUpload, close_all, error_of, flat_png, full_request, multipart, png, read_response, until
from serving_helpers import LiveServer, live_server, queue_held
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from effnet_serve.core.config import Settings

IMAGE = png()  # 73x73: decodes to ~75 kB of budget
BIG_PIXELS = flat_png(300)  # a few hundred bytes that decode to 300x300 (~1.3 MB of budget)
PNG = {"content-type": "image/png"}
MAX_BODY_MB = 0.1  # 104857 bytes: a bigger body is 413
BUDGET_MB = 0.5  # 524288 bytes: above two whole bodies in flight (each chunk is charged twice while read)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(repo: Path, **overrides) -> Iterator[LiveServer]:
    """A fresh server per test, so `peak` speaks of that test's requests only."""
    options = dict(repository=repo, models=["tiny"], default_model="tiny", max_body_mb=MAX_BODY_MB,
                   max_inflight_mb=BUDGET_MB, threads=1, decode_workers=1, device="cpu", grpc_port=free_port())
    options.update(overrides)
    with live_server(Settings(**options)) as srv:
        yield srv


def released(srv: LiveServer, what: str) -> None:
    until(lambda: srv.plane.memory.used == 0, what=f"the budget back to 0 after {what} (still {srv.plane.memory.used})")
    assert srv.plane.memory.used == 0


@contextlib.contextmanager
def holding(executor) -> Iterator[None]:
    """Keep a single-thread executor's thread busy until the block ends."""
    gate = threading.Event()
    executor.submit(gate.wait, 120)
    try:
        yield
    finally:
        gate.set()


def _v2_bytes(image: bytes) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(image).decode()]}]}).encode()


def _v2_fp32_binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return head + raw, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}


def _multipart(*images: bytes) -> tuple[bytes, dict[str, str]]:
    body, ctype = multipart(*images)
    return body, {"content-type": ctype}


def _grpc_request(raw: bytes, shape: list[int], datatype: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="images", datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
    return req


def _grpc_bytes(image: bytes) -> bytes:
    return len(image).to_bytes(4, "little") + image  # tritonclient's BYTES element framing


@pytest.fixture
def stub_for():
    channels = []

    def make(srv: LiveServer) -> service_pb2_grpc.GRPCInferenceServiceStub:
        ch = grpc.insecure_channel(f"127.0.0.1:{srv.app.state.grpc.port}")
        channels.append(ch)
        return service_pb2_grpc.GRPCInferenceServiceStub(ch)

    yield make
    for ch in channels:
        ch.close()


@pytest.fixture(autouse=True)
def _no_socket_outlives_its_test():
    yield
    close_all()


# --- answered ------------------------------------------------------------------------------------
def test_answered_requests_give_everything_back(tiny_repo):
    with serve(tiny_repo) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/classify", content=IMAGE, headers=PNG)
        assert r.status_code == 200, r.text
        released(srv, "a raw-body 200")
        assert srv.plane.memory.peak >= len(IMAGE)  # it was charged: the body, then its pixels

        body, headers = _multipart(IMAGE, png(seed=1))
        r = c.post("/classify", content=body, headers=headers)
        assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
        released(srv, "a multipart 200")

        r = c.post("/v2/models/tiny/infer", content=_v2_bytes(IMAGE), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        released(srv, "a /v2 BYTES 200")

        body, headers = _v2_fp32_binary(np.zeros((2, 3, 64, 64), np.float32))
        r = c.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        released(srv, "a /v2 FP32 200")


# --- refused -------------------------------------------------------------------------------------
def test_a_body_over_the_size_limit_gives_back_what_it_was_charged(tiny_repo):
    too_big = np.random.default_rng(0).integers(0, 256, 150_000, dtype=np.uint8).tobytes()
    with serve(tiny_repo) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/classify", content=too_big, headers=PNG)  # Content-Length says so: refused before reading
        assert r.status_code == 413, r.text
        released(srv, "a 413 on Content-Length")

        def chunks():  # no Content-Length: the limit is found while reading (how many chunks were charged
            for i in range(0, len(too_big), 16_384):  # first depends on how the server's reads fall)
                yield too_big[i:i + 16_384]

        r = c.post("/classify", content=chunks(), headers=PNG)
        assert r.status_code == 413, r.text
        released(srv, "a 413 found while reading")


def test_a_body_too_slow_gives_back_what_arrived(tiny_repo):
    with serve(tiny_repo, body_timeout_s=1.0, min_upload_kbps=0) as srv:
        half = 40_000
        held = HeldUpload(srv.port, "/classify", bytes(80_000), sent=half)
        status, headers, body = held.answer()  # the server gives up on the rest
        assert status == 408 and headers.get("connection") == "close", (status, headers, body)
        assert error_of(status, headers, body)["code"] == "request_timeout"
        assert srv.plane.memory.peak >= 2 * half  # what arrived was held while the rest was awaited
        released(srv, "a 408")


def test_refusals_for_a_full_budget_or_a_full_queue_give_everything_back(tiny_repo):
    with serve(tiny_repo, max_queue=4, admission_wait_ms=0, min_upload_kbps=0, body_timeout_s=600) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        # Pixels that do not fit: refused while decoding, after the body was charged.
        r = c.post("/classify", content=BIG_PIXELS, headers=PNG)
        assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
        assert "MB" in r.json()["error"]["message"]
        released(srv, "a 503 for pixels over the budget")

        # Bodies that do not fit: two uploads held half-sent hold most of the budget, a third runs out of it
        # mid-body. Then the two leave.
        held = [HeldUpload(srv.port, "/classify", bytes(100_000), sent=90_000) for _ in range(2)]
        until(lambda: srv.plane.memory.used >= 2 * 2 * 90_000, what="two held bodies charged")
        r = c.post("/classify", content=bytes(100_000), headers=PNG)
        assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
        assert r.json()["error"]["code"] == "overloaded"
        for h in held:
            h.leave()
        released(srv, "a 503 for bodies over the budget and two clients gone mid-upload")

        # A queue without room for both images of a request, once its body is in (stage two).
        body, headers = _multipart(IMAGE, png(seed=1))
        with queue_held(srv, "tiny", 3):
            r = c.post("/classify", content=body, headers=headers)
        assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"], r.text
        released(srv, "a 503 for a full queue")
        assert c.post("/classify", content=body, headers=headers).status_code == 200  # and it all still works
        released(srv, "a 200 after the refusals")


def test_a_refusal_on_the_last_chunk_of_a_body_is_answered_and_gives_everything_back(tiny_repo):
    """The chunk that breaks a limit may be the body's last one: the server must answer then, not wait for more
    of a body that has ended (no rate floor, a 600 s body timeout: waiting would mean no answer at all)."""
    size = 200_000
    # Room for all of the body but its last byte (each byte is charged twice while the body is read).
    budget_mb = (2 * size - 1) / (1 << 20)
    with serve(tiny_repo, max_body_mb=1.0, max_inflight_mb=budget_mb, min_upload_kbps=0, body_timeout_s=600) as srv:
        held = HeldUpload(srv.port, "/classify", bytes(size), sent=size - 1)
        until(lambda: srv.plane.memory.used == 2 * (size - 1), what="all but the last byte charged")
        status, headers, body = held.finish(timeout=60)  # the last byte does not fit
        assert status == 503 and headers["retry-after"].isdigit(), (status, headers, body)
        assert error_of(status, headers, body)["code"] == "overloaded"
        released(srv, "a 503 on the last chunk")

    # The same for the size limit, on a chunked body (no Content-Length): the limit is passed by its last chunk.
    with serve(tiny_repo, min_upload_kbps=0, body_timeout_s=600) as srv:
        limit = srv.plane.settings.max_body_bytes
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        try:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + f"{limit:x}\r\n".encode() + bytes(limit) + b"\r\n")
            until(lambda: srv.plane.memory.used == 2 * limit, what="the body up to its limit charged")
            sock.sendall(b"1\r\nx\r\n0\r\n\r\n")  # one byte too many, and the end of the body
            status, headers, body = read_response(sock, timeout=60)
        finally:
            sock.close()
        assert status == 413 and error_of(status, headers, body)["code"] == "payload_too_large", (status, body)
        released(srv, "a 413 on the last chunk")


# --- the client leaves -----------------------------------------------------------------------------
def test_a_client_leaving_mid_upload_mid_decode_or_mid_inference_gives_everything_back(tiny_repo):
    with serve(tiny_repo, min_upload_kbps=0, body_timeout_s=600) as srv:
        batcher = srv.plane.registry.entries["tiny"].batcher

        held = HeldUpload(srv.port, "/classify", IMAGE, sent=len(IMAGE) // 2)
        until(lambda: srv.plane.memory.used > 0, what="the half body charged")
        held.leave()
        released(srv, "a client gone mid-upload")

        with holding(srv.plane.decode_pool):  # its one decode thread is busy: the image waits to be decoded
            sock = full_request(srv.port, "/classify", IMAGE)
            until(lambda: batcher.room.reserved == 1, what="the request admitted, its image waiting for decode")
            assert srv.plane.memory.used >= len(IMAGE)
            sock.close()
            released(srv, "a client gone while its image waited for decode")  # before the decode pool is free

        with holding(batcher._executor):  # the model's inference thread is busy: the image waits for inference
            sock = full_request(srv.port, "/classify", IMAGE)
            until(lambda: batcher.room.reserved == 0 and batcher.room.used == 1, what="the image queued for inference")
            assert srv.plane.memory.used >= len(IMAGE)  # the body is still held; the pixels were given back
            sock.close()
            released(srv, "a client gone while its image waited for inference")
        until(lambda: batcher.room.used == 0, what="the queue empty again")
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/classify", content=IMAGE, headers=PNG).status_code == 200
        released(srv, "a 200 afterwards")


# --- gRPC ---------------------------------------------------------------------------------------
def test_grpc_model_infer_gives_everything_back(tiny_repo, stub_for):
    with serve(tiny_repo) as srv:
        stub = stub_for(srv)
        x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
        resp = stub.ModelInfer(_grpc_request(x.tobytes(), [1, 3, 64, 64], "FP32"), timeout=60)
        assert resp.outputs[0].shape == [1, 1000]
        released(srv, "a gRPC FP32 answer")
        assert srv.plane.memory.peak >= x.nbytes

        resp = stub.ModelInfer(_grpc_request(_grpc_bytes(IMAGE), [1], "BYTES"), timeout=60)
        assert resp.outputs[0].shape == [1, 1000]
        released(srv, "a gRPC BYTES answer")

        with pytest.raises(grpc.RpcError) as e:  # pixels over the budget: UNAVAILABLE, the message given back
            stub.ModelInfer(_grpc_request(_grpc_bytes(BIG_PIXELS), [1], "BYTES"), timeout=60)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        released(srv, "a gRPC refusal for the budget")

        batcher = srv.plane.registry.entries["tiny"].batcher
        with holding(batcher._executor):
            call = stub.ModelInfer.future(_grpc_request(x.tobytes(), [1, 3, 64, 64], "FP32"), timeout=120)
            until(lambda: batcher.room.used == 1, what="the gRPC call queued for inference")
            assert srv.plane.memory.used >= x.nbytes
            call.cancel()  # the client gives up while its tensor waits for the model
            with pytest.raises(grpc.FutureCancelledError):
                call.result()
            released(srv, "a gRPC call cancelled mid-inference")
