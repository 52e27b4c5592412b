"""The grpc.aio server, on the app's own event loop: started by the lifespan once the data plane exists
(EFFNET_GRPC_PORT, default 8001; 0 turns it off), stopped before the registry closes.

Limits, as on HTTP: a message larger than EFFNET_MAX_BODY_MB is refused by grpc itself
(RESOURCE_EXHAUSTED; its default would be 4 MiB), and at most EFFNET_MAX_CONNECTIONS calls run at once
(RESOURCE_EXHAUSTED beyond). The port is bound exclusively (no SO_REUSEPORT), so a port another process
holds fails the start instead of silently sharing its traffic.
"""

from __future__ import annotations

import logging

import grpc
from tritonclient.grpc import service_pb2_grpc

from app.api.grpc.servicer import InferenceServicer
from app.engine.facade import Plane

log = logging.getLogger("effnet.grpc")


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    def __init__(self, plane: Plane, host: str, shared_port: bool = False) -> None:
        settings = plane.settings
        self.address = address(host, settings.grpc_port)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                # One process alone must own its port (a second start fails loudly); worker processes
                # share theirs, each with its own listening socket (the kernel spreads connections).
                ("grpc.so_reuseport", 1 if shared_port else 0),
            ],
            maximum_concurrent_rpcs=settings.max_connections,
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), self.server)
        self.port: int | None = None

    async def start(self) -> GrpcServer:
        why = f"gRPC: cannot listen on {self.address} (EFFNET_GRPC_PORT; 0 turns gRPC off)"
        try:
            self.port = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(why) from exc
        if not self.port:  # older grpcio answers 0 instead of raising
            raise RuntimeError(why)
        await self.server.start()
        log.info("gRPC (Open Inference Protocol) on %s", self.address)
        return self

    async def stop(self, grace_s: float) -> None:
        """No new calls from now on; those in flight get up to grace_s, then are cancelled."""
        await self.server.stop(grace_s)


async def start_grpc(plane: Plane, host: str, shared_port: bool = False) -> GrpcServer:
    return await GrpcServer(plane, host, shared_port).start()
