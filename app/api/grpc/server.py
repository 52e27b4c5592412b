"""The grpc.aio server, on the app's own event loop: started by the lifespan once the data plane exists
(EFFNET_GRPC_PORT, default 8001; 0 turns it off), stopped before the registry closes.

Where: EFFNET_GRPC_HOST, else the HTTP host; over TLS when EFFNET_TLS_CERT/EFFNET_TLS_KEY are set (the
same files as HTTPS), else plaintext. The port is bound exclusively (no SO_REUSEPORT) in a single process,
so a port another process holds fails the start instead of silently sharing its traffic.

Bounds on what a client can make it hold: per call, interceptors.Guard (the key before the message, a slot,
a deadline on the message, its memory); per connection and per message, the transport options below.
"""

from __future__ import annotations

import logging

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .interceptors import Guard
from .servicer import InferenceServicer
from ...core.config import Settings
from ...engine.facade import Plane

log = logging.getLogger("effnet.grpc")

# Keepalive enforcement (grpc core's, as grpc-go's EnforcementPolicy): a client may ping an idle connection
# (a load balancer's health check does), but at most once per MIN_PING_S; after MAX_PING_STRIKES pings
# sooner than that, the connection is closed with GOAWAY ENHANCE_YOUR_CALM. The server pings a quiet
# connection every KEEPALIVE_S and drops it when no answer comes in KEEPALIVE_TIMEOUT_S (a peer gone
# without a FIN holds nothing for hours).
MIN_PING_S = 10
MAX_PING_STRIKES = 2
KEEPALIVE_S = 60
KEEPALIVE_TIMEOUT_S = 20


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def transport_options(settings: Settings, shared_port: bool) -> list[tuple[str, int]]:
    """grpc core's channel arguments (grpc_types.h) for the limits of one connection."""
    return [
        # A message larger than EFFNET_MAX_BODY_MB is refused by grpc itself (RESOURCE_EXHAUSTED; its default
        # would be 4 MiB).
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        # Streams one connection may hold open (SETTINGS_MAX_CONCURRENT_STREAMS; more are refused).
        ("grpc.max_concurrent_streams", settings.grpc_max_streams),
        # Counted until grpc has really freed them, so a client resetting streams cannot churn past the cap.
        ("grpc.http.overload_protection", 1),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_S * 1000),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
        # A connection without a call for this long is closed (GOAWAY): idle connections are not free.
        ("grpc.max_connection_idle_ms", int(settings.grpc_idle_s * 1000)),
        # Any connection is closed after this long, its calls in flight given the longest a call may take
        # (its message, then its wait for a result): clients reconnect and spread over the replicas again.
        ("grpc.max_connection_age_ms", int(settings.grpc_max_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int((settings.body_timeout_s + settings.request_timeout_s) * 1000)),
        # One process alone must own its port (a second start fails loudly); worker processes share
        # theirs, each with its own listening socket (the kernel spreads connections).
        ("grpc.so_reuseport", 1 if shared_port else 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    return grpc.ssl_server_credentials([pair])


class GrpcServer:
    def __init__(self, plane: Plane, host: str, shared_port: bool = False) -> None:
        settings = plane.settings
        self.address = address(settings.grpc_host or host, settings.grpc_port)
        self.credentials = server_credentials(settings)
        service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        self.guard = Guard(plane, InferenceServicer.health_paths(), {m.name: m.input_type for m in service.methods},
                           InferenceServicer.served())
        self.server = grpc.aio.server(
            interceptors=[self.guard],
            options=transport_options(settings, shared_port),
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), self.server)
        self.port: int | None = None

    async def start(self) -> GrpcServer:
        why = f"gRPC: cannot listen on {self.address} (EFFNET_GRPC_HOST, EFFNET_GRPC_PORT; 0 turns gRPC off)"
        try:
            if self.credentials is None:
                self.port = self.server.add_insecure_port(self.address)
            else:
                self.port = self.server.add_secure_port(self.address, self.credentials)
        except RuntimeError as exc:
            raise RuntimeError(why) from exc
        if not self.port:  # older grpcio answers 0 instead of raising
            raise RuntimeError(why)
        await self.server.start()
        log.info("gRPC (Open Inference Protocol) on %s%s", self.address, " with TLS" if self.credentials else "")
        return self

    async def stop(self, grace_s: float) -> None:
        """No new calls from now on; those in flight get up to grace_s, then are cancelled."""
        await self.server.stop(grace_s)


async def start_grpc(plane: Plane, host: str, shared_port: bool = False) -> GrpcServer:
    return await GrpcServer(plane, host, shared_port).start()
