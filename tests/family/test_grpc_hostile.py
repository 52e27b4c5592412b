"""gRPC against hostile clients (issue 21, finding 3): what a client can make the gRPC port hold is bounded.

Each test is the attack a reviewer ran against a real server, or the bound that stops it, with real sockets:
keyless 16 MB messages (refused before they are read: the server's RSS does not grow by them), one
connection opening 2000 half-sent streams (other clients' probes and calls still answer), a message that
never arrives (the call ends after EFFNET_BODY_TIMEOUT_S), idle and old connections (GOAWAY), the memory
budget charged while the call waits, EFFNET_GRPC_HOST, and TLS. The hostile connections are raw HTTP/2
frames written here: a library client (h2, grpcio) obeys the server's SETTINGS, which is what a hostile
client does not do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from reliability_helpers import free_port, rss_kb
from serving_helpers import LiveServer, live_server, queue_held
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from effnet_serve.core.config import Settings

KEY = "k3y-for-hostile-tests"
INFER = "/inference.GRPCInferenceService/ModelInfer"


@contextlib.contextmanager
def serve(repo: Path, **overrides) -> Iterator[LiveServer]:
    kw = dict(repository=repo, models=["tiny"], default_model="tiny", threads=1, decode_workers=2, device="cpu",
              grpc_port=free_port())
    with live_server(Settings(**{**kw, **overrides})) as srv:
        yield srv


def grpc_port(srv: LiveServer) -> int:
    return srv.app.state.grpc.port


def guards(srv: LiveServer) -> list:
    """Every front end's gRPC guard (one per worker process when EFFNET_TEST_WORKERS > 1)."""
    return [app.state.grpc.guard for app in getattr(srv, "apps", [srv.app])]


def infer_request(images: int = 1) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="images", datatype="FP32", shape=[images, 3, 64, 64])
    req.raw_input_contents.append(np.zeros((images, 3, 64, 64), "<f4").tobytes())
    return req


# --- a raw HTTP/2 client -----------------------------------------------------------------------------------
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
END_STREAM, END_HEADERS, ACK = 1, 4, 1


def _literal(name: str, value: str) -> bytes:
    """An HPACK header field, literal and never indexed, no Huffman (RFC 7541 6.2.2); names and values < 127."""
    n, v = name.encode(), value.encode()
    return b"\x10" + bytes([len(n)]) + n + bytes([len(v)]) + v


class RawH2:
    """One TCP connection speaking HTTP/2 frame by frame, obeying nothing the server asks."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + self.frame(SETTINGS, 0, 0, b""))
        self.buf = b""
        self.settings: dict[int, int] = {}
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closed = False

    @staticmethod
    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def handshake(self) -> None:
        """Read the server's SETTINGS and acknowledge them, as any HTTP/2 client library would."""
        self.read_until(lambda: any(k == SETTINGS and not f & ACK for k, f, _, _ in self.frames), 30)

    def open_call(self, stream: int, path: str, prefix: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
        """A gRPC call's HEADERS and the start of its message; the rest never follows."""
        block = b"".join(_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers"), *metadata))
        return self.frame(HEADERS, END_HEADERS, stream, block) + self.frame(DATA, 0, stream, prefix)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, done, timeout_s: float) -> bool:
        """Read frames (answering SETTINGS and PING as a live peer does) until done() or the deadline."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.closed or time.monotonic() > deadline:
                return done()
            self.sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                continue
            self.buf += chunk
            while len(self.buf) >= 9:
                size = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + size:
                    break
                kind, flags = self.buf[3], self.buf[4]
                stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                payload, self.buf = self.buf[9:9 + size], self.buf[9 + size:]
                self.frames.append((kind, flags, stream, payload))
                if kind == SETTINGS and not flags & ACK:
                    for i in range(0, len(payload), 6):
                        ident, value = struct.unpack(">HI", payload[i:i + 6])
                        self.settings[ident] = value
                    with contextlib.suppress(OSError):
                        self.sock.sendall(self.frame(SETTINGS, ACK, 0, b""))
                elif kind == PING and not flags & ACK:
                    with contextlib.suppress(OSError):
                        self.sock.sendall(self.frame(PING, ACK, 0, payload))
        return True

    def ended_streams(self) -> set[int]:
        """Streams the server has ended: refused (RST_STREAM) or answered to the end (END_STREAM)."""
        return {s for k, f, s, _ in self.frames if k == RST_STREAM or (k in (HEADERS, DATA) and f & END_STREAM)}

    def goaway(self) -> bool:
        return any(k == GOAWAY for k, _, _, _ in self.frames)

    def close(self) -> None:
        self.sock.close()


# --- the key before the message ------------------------------------------------------------------------------
KEYLESS_CLIENT = """
import sys, grpc
from concurrent.futures import ThreadPoolExecutor
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc
req = pb.ModelInferRequest(model_name="tiny")
req.inputs.add(name="images", datatype="FP32", shape=[1])
req.raw_input_contents.append(bytes(16 << 20))
codes = []
with grpc.insecure_channel(sys.argv[1], options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    def call(_):
        try:
            stub.ModelInfer(req, timeout=120)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(16)))
print(",".join(codes))
"""


def test_keyless_16mb_messages_are_refused_before_they_are_read(tiny_family_repo):
    """16 keyless 16 MB ModelInfer calls at once (the reviewer's attack; it left the server +215 MB): all are
    refused UNAUTHENTICATED, and the server's resident memory has not grown by their 256 MB."""
    with serve(tiny_family_repo, api_key=KEY, max_body_mb=20) as srv:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port(srv)}") as ch:  # warm: the first call's one-off costs
            stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ModelInfer(infer_request(), metadata=(("x-api-key", KEY),), timeout=60).outputs
        before = rss_kb(os.getpid())  # the server under test runs in this process
        out = subprocess.run([sys.executable, "-c", KEYLESS_CLIENT, f"127.0.0.1:{grpc_port(srv)}"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [",".join(["UNAUTHENTICATED"] * 16)]
        time.sleep(3)
        grown = (rss_kb(os.getpid()) - before) << 10
        assert grown < 96 << 20, f"RSS grew by {grown >> 20} MB after 16 refused 16 MB messages"


# --- a half-sent stream flood on one connection ---------------------------------------------------------------
@pytest.mark.parametrize("settings_first", [True, False], ids=["after-settings", "before-settings"])
def test_half_sent_streams_on_one_connection_do_not_starve_other_clients(tiny_family_repo, settings_first):
    """One connection opens 2000 ModelInfer streams, each sending only its message's 5-byte prefix (the
    reviewer's attack: every other client's ServerLive then got RESOURCE_EXHAUSTED), after acknowledging the
    server's SETTINGS or before even reading them. The connection gets at most EFFNET_GRPC_MAX_STREAMS of
    them; another client's ServerLive, ServerReady and ModelInfer answer. EFFNET_BODY_TIMEOUT_S is long
    here, so it is not what frees them."""
    with serve(tiny_family_repo, max_connections=1000, body_timeout_s=600) as srv:
        flood = RawH2(grpc_port(srv))
        try:
            if settings_first:
                flood.handshake()
                assert flood.settings.get(3) == srv.plane.settings.grpc_max_streams  # SETTINGS_MAX_CONCURRENT_STREAMS
            prefix = b"\x00" + (1 << 20).to_bytes(4, "big")  # "a 1 MiB message follows"; it never does
            streams = range(1, 4001, 2)
            flood.send(b"".join(flood.open_call(s, INFER, prefix) for s in streams))
            # The server refuses the streams beyond its cap (or closes the connection that ignores it).
            flood.read_until(lambda: len(flood.ended_streams()) >= 2000 - srv.plane.settings.grpc_max_streams, 60)
            assert flood.closed or len(flood.ended_streams()) >= 2000 - srv.plane.settings.grpc_max_streams
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port(srv)}") as ch:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
                assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
                assert stub.ModelInfer(infer_request(), timeout=60).outputs[0].name == "logits"
            held = sum(g.calls for g in guards(srv))
            assert held <= srv.plane.settings.grpc_max_streams, held
        finally:
            flood.close()


def test_the_probes_answer_while_every_call_slot_is_held(tiny_family_repo):
    """Many connections together can hold every call slot (EFFNET_MAX_CONNECTIONS) with half-sent calls:
    further calls are refused UNAVAILABLE with retry-after, and the health probes, which take no slot, answer."""
    with serve(tiny_family_repo, max_connections=4, body_timeout_s=600) as srv:
        # Connections of 4 half-sent calls each, until every front end's slots are held (worker processes
        # each have their own; the kernel picks which one a connection reaches).
        hostile: list[RawH2] = []
        deadline = time.monotonic() + 60
        try:
            while any(g.calls < 4 for g in guards(srv)) and time.monotonic() < deadline and len(hostile) < 32:
                conn = RawH2(grpc_port(srv))
                hostile.append(conn)
                conn.handshake()
                conn.send(b"".join(conn.open_call(s, INFER, b"\x00\x00\x01\x00\x00") for s in (1, 3, 5, 7)))
                for _ in range(10):
                    for c in hostile:
                        c.read_until(lambda: False, 0.05)
            assert all(g.calls == 4 for g in guards(srv)), [g.calls for g in guards(srv)]
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port(srv)}") as ch:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
                assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
                with pytest.raises(grpc.RpcError) as e:
                    stub.ModelInfer(infer_request(), timeout=30)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
                assert int(dict(e.value.trailing_metadata())["retry-after"]) >= 1
        finally:
            for conn in hostile:
                conn.close()
        deadline = time.monotonic() + 30  # the hostile connections gone, their slots come back
        while sum(g.calls for g in guards(srv)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(g.calls for g in guards(srv)) == 0


# --- a message that never arrives ------------------------------------------------------------------------------
def test_a_message_not_in_within_the_body_timeout_ends_the_call(tiny_family_repo):
    """A call whose message has not arrived within EFFNET_BODY_TIMEOUT_S is ended DEADLINE_EXCEEDED (as HTTP's
    408), and its slot is freed; the client's own deadline (120 s) is far beyond."""
    with serve(tiny_family_repo, body_timeout_s=2) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{grpc_port(srv)}") as ch:
        never = threading.Event()

        def nothing():
            never.wait(150)  # the message never comes
            yield from ()

        call = ch.stream_unary(INFER, request_serializer=lambda m: m,
                               response_deserializer=pb.ModelInferResponse.FromString)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                call(nothing(), timeout=120)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "did not arrive within 2 s" in e.value.details()
            assert time.monotonic() - started < 60
        finally:
            never.set()
        deadline = time.monotonic() + 30
        while sum(g.calls for g in guards(srv)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(g.calls for g in guards(srv)) == 0


def test_a_malformed_or_missing_message_is_invalid_argument(tiny_family_repo):
    """Bytes that are not a ModelInferRequest, or a call closed without any message: INVALID_ARGUMENT (the
    client's fault, as HTTP's 400), and the call's slot and memory given back."""
    with serve(tiny_family_repo) as srv, grpc.insecure_channel(f"127.0.0.1:{grpc_port(srv)}") as ch:
        garbage = ch.unary_unary(INFER, request_serializer=lambda m: m,
                                 response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            garbage(b"\xff\xff\xff\xff", timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        empty = ch.stream_unary(INFER, request_serializer=lambda m: m,
                                response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            empty(iter(()), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        deadline = time.monotonic() + 30
        while (sum(g.calls for g in guards(srv)) or srv.plane.memory.used) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(g.calls for g in guards(srv)) == 0 and srv.plane.memory.used == 0


@pytest.mark.parametrize("flood", ["inputs", "bytes_elements"])
def test_a_message_of_millions_of_tiny_fields_is_refused_before_it_is_parsed(tiny_family_repo, flood):
    """A field costs two bytes on the wire and an object once parsed: 19 MB of empty `inputs` entries parsed into
    ~650 MB (the reviewer's measure), and 10 M empty BYTES elements took seconds of the event loop to refuse.
    Counted from the bytes first (app/api/grpc/message_limits.py), such a message is refused INVALID_ARGUMENT
    saying so, the server's peak memory does not grow by the parse, and the next call is served."""
    if flood == "inputs":
        one = pb.ModelInferRequest()
        one.inputs.add().parameters["a"].bool_param = True
        piece = one.SerializeToString()
        message = pb.ModelInferRequest(model_name="tiny").SerializeToString() + piece * ((19 << 20) // len(piece))
    else:
        req = pb.ModelInferRequest(model_name="tiny")
        req.inputs.add(name="images", datatype="BYTES", shape=[1]).contents.bytes_contents.extend([b""] * 5_000_000)
        message = req.SerializeToString()
    with serve(tiny_family_repo, max_body_mb=24) as srv, grpc.insecure_channel(
            f"127.0.0.1:{grpc_port(srv)}", options=[("grpc.max_send_message_length", 32 << 20)]) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelInfer(infer_request(), timeout=60).outputs  # warm
        raw = ch.unary_unary(INFER, request_serializer=lambda m: m, response_deserializer=lambda b: b)
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from now (the server is in here)
        before = peak_rss()
        with pytest.raises(grpc.RpcError) as e:
            raw(message, timeout=120)
        grown = peak_rss() - before
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert "strings, tensors and sub-messages" in e.value.details()
        if not getattr(srv, "apps", None):  # with worker processes the parse would happen in another process
            assert grown < 96 << 20, f"one {len(message) >> 20} MB message took the peak RSS up {grown >> 20} MB"
        assert stub.ModelInfer(infer_request(), timeout=60).outputs


PROBES_CLIENT = r"""
import sys, grpc
from concurrent.futures import ThreadPoolExecutor
size = 16 << 20
head = bytes([0x7A, 0x80, 0x80, 0x80, 0x08])  # field 15, length-delimited, 16 MiB: a field no probe has
junk = head + bytes(size)
with grpc.insecure_channel(sys.argv[1], options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
    live = ch.unary_unary("/inference.GRPCInferenceService/ServerLive", request_serializer=lambda m: m,
                          response_deserializer=lambda b: b)
    def call(_):
        try:
            live(junk, timeout=120)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name
    with ThreadPoolExecutor(24) as pool:
        print(",".join(pool.map(call, range(24))))
"""


def test_probes_carrying_big_messages_hold_nothing(tiny_family_repo):
    """ServerLive and ServerReady take no call slot (so busy slots cannot fail them): they must not read a
    message either, or each would hold up to EFFNET_MAX_BODY_MB outside every bound (24 probes of 16 MB once
    took the server's peak RSS up 620 MB past a 32 MB budget). They answer without it."""
    with serve(tiny_family_repo, max_connections=4, max_inflight_mb=32, max_body_mb=20) as srv:
        target = f"127.0.0.1:{grpc_port(srv)}"
        with grpc.insecure_channel(target) as ch:  # warm: the first call's one-off costs
            assert service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=30).live
        Path("/proc/self/clear_refs").write_text("5")
        before = peak_rss()
        out = subprocess.run([sys.executable, "-c", PROBES_CLIENT, target], capture_output=True, text=True,
                             timeout=300)
        grown = peak_rss() - before
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [",".join(["OK"] * 24)]
        if not getattr(srv, "apps", None):  # the probes are served in this process
            assert grown < 128 << 20, f"24 probes of 16 MB took the peak RSS up {grown >> 20} MB"


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no VmHWM")


def test_methods_not_served_are_unimplemented_need_the_key_and_log_nothing(tiny_family_repo, caplog):
    """The protocol's methods this server does not implement (ModelStreamInfer, ModelStatistics, shared memory,
    trace) once fell through to the generated base class, which raises: grpc.aio logged an ERROR traceback per
    call, and ModelStreamInfer, streaming, passed the guard without its key. Now the key first, then
    UNIMPLEMENTED, and no log line a client can repeat."""
    import logging

    caplog.set_level(logging.ERROR)
    with serve(tiny_family_repo, api_key=KEY) as srv, grpc.insecure_channel(f"127.0.0.1:{grpc_port(srv)}") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        key = (("x-api-key", KEY),)

        def code(call) -> grpc.StatusCode:
            try:
                call()
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        def stream(metadata=()):
            return list(stub.ModelStreamInfer(iter([infer_request()]), metadata=metadata, timeout=30))

        assert code(stream) == grpc.StatusCode.UNAUTHENTICATED
        assert code(lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny"), timeout=30)) \
            == grpc.StatusCode.UNAUTHENTICATED
        for _ in range(10):
            assert code(lambda: stream(key)) == grpc.StatusCode.UNIMPLEMENTED
            assert code(lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny"), metadata=key,
                                                     timeout=30)) == grpc.StatusCode.UNIMPLEMENTED
            assert code(lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=key,
                                                              timeout=30)) == grpc.StatusCode.UNIMPLEMENTED
        assert stub.ModelInfer(infer_request(), metadata=key, timeout=60).outputs  # served as before
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:2]


# --- idle and old connections ---------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["grpc_idle_s", "grpc_max_age_s"])
def test_idle_and_old_connections_are_closed(tiny_family_repo, limit):
    """EFFNET_GRPC_IDLE_S: a connection without a call is sent GOAWAY; EFFNET_GRPC_MAX_AGE_S: any connection is,
    at that age. (Each limit alone is short here; the other is at its default, minutes.)"""
    with serve(tiny_family_repo, **{limit: 2.0}) as srv:
        conn = RawH2(grpc_port(srv))
        try:
            conn.handshake()
            assert conn.read_until(conn.goaway, 60), "no GOAWAY within 60 s"
        finally:
            conn.close()


# --- memory -------------------------------------------------------------------------------------------------------
def test_the_message_is_charged_to_the_memory_budget_while_the_call_waits(tiny_family_repo):
    """A ModelInfer waiting for queue room already holds its message against EFFNET_MAX_INFLIGHT_MB."""
    with serve(tiny_family_repo, admission_wait_ms=30_000) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{grpc_port(srv)}") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = infer_request(8)  # 8 x 49 kB
        size = len(req.raw_input_contents[0])
        with queue_held(srv, "tiny", srv.plane.settings.max_queue):
            future = stub.ModelInfer.future(req, timeout=60)
            deadline = time.monotonic() + 30
            while srv.plane.memory.used < size and time.monotonic() < deadline and not future.done():
                time.sleep(0.02)
            assert srv.plane.memory.used >= size
        assert future.result(timeout=60).outputs[0].name == "logits"
        deadline = time.monotonic() + 30
        while srv.plane.memory.used and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.plane.memory.used == 0


# --- where and how it listens ---------------------------------------------------------------------------------
def test_grpc_host_is_grpc_own_bind_address(tiny_family_repo):
    """EFFNET_GRPC_HOST=127.0.0.2 while HTTP listens on 127.0.0.1: gRPC answers there, and only there."""
    with serve(tiny_family_repo, grpc_host="127.0.0.2") as srv:
        port = grpc_port(srv)
        with grpc.insecure_channel(f"127.0.0.2:{port}") as ch:
            assert service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=30).live
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_when_cert_and_key_are_set(tiny_family_repo, tmp_path):
    """EFFNET_TLS_CERT/EFFNET_TLS_KEY: a client trusting the certificate is served; a plaintext one is not."""
    cert, key = _self_signed(tmp_path)
    with serve(tiny_family_repo, tls_cert=cert, tls_key=key) as srv:
        target = f"127.0.0.1:{grpc_port(srv)}"
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
            assert stub.ModelInfer(infer_request(), timeout=60).outputs[0].name == "logits"
        with grpc.insecure_channel(target) as ch:
            with pytest.raises(grpc.RpcError) as e:
                service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
