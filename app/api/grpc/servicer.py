"""The GRPCInferenceService RPCs, each the gRPC face of an HTTP V2 endpoint over the same objects:

    ServerLive / ServerReady      GET /v2/health/live | ready     (ready: registry ready and not draining)
    ServerMetadata                GET /v2                          descriptions.server_metadata
    ModelReady                    GET /v2/models/{m}/ready         ready=false for an unknown model (Triton's way)
    ModelMetadata / ModelConfig   GET /v2/models/{m}[/config]      descriptions.metadata / model_config
    ModelInfer                    POST /v2/models/{m}/infer        the data plane: open -> tensors | images
    RepositoryIndex               POST /v2/repository/index        plane.index()
    RepositoryModelLoad / Unload  POST /v2/repository/models/{m}/load | unload   plane.load | unload

The data plane records every inference's admission, status and duration on /metrics, as for HTTP; nothing
here records them again. RPCs the service does not offer (statistics, shared memory, tracing, logging,
streaming) answer UNIMPLEMENTED, from the generated base class.
"""

from __future__ import annotations

import asyncio

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from .status import rpc
from .tensors import encode_response, parse_request
from ...core.errors import ApiError, BadRequest
from ..v2.descriptions import find_entry, metadata, model_config, server_metadata
from ...engine.facade import Plane
from ...engine.registry import valid_name


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: Plane) -> None:
        self.plane = plane

    @classmethod
    def health_paths(cls) -> dict[str, str]:
        """The RPCs that follow an HTTP path's key exemption (the probes), and that path."""
        return {name: m.http_path for name, m in vars(cls).items() if getattr(m, "http_path", None)}

    @classmethod
    def served(cls) -> frozenset[str]:
        """The RPCs this servicer implements; the generated base class's others only raise NotImplementedError."""
        return frozenset(name for name, m in vars(cls).items() if hasattr(m, "http_path"))

    # --- health and descriptions ---------------------------------------------------------
    @rpc("/v2/health/live", while_draining=True)
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc("/v2/health/ready", while_draining=True)
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.readiness().ready)

    @rpc(while_draining=True)
    async def ModelReady(self, request, context):
        try:
            entry = find_entry(self.plane, request.name, request.version)
        except ApiError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=entry.serving and not self.plane.draining)

    @rpc(while_draining=True)  # a description, answered while draining as over HTTP
    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(server_metadata(), pb.ServerMetadataResponse())

    @rpc(while_draining=True)  # a description, answered while draining as over HTTP
    async def ModelMetadata(self, request, context):
        entry = find_entry(self.plane, request.name, request.version)
        return json_format.ParseDict(metadata(entry), pb.ModelMetadataResponse())

    @rpc(while_draining=True)  # a description, answered while draining as over HTTP
    async def ModelConfig(self, request, context):
        entry = find_entry(self.plane, request.name, request.version)
        config = json_format.ParseDict(model_config(entry, self.plane), mc.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    # --- inference -----------------------------------------------------------------------
    @rpc(while_draining=True)  # the data plane refuses it while draining, and counts the refusal
    async def ModelInfer(self, request, context):
        plane = self.plane
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        entry = find_entry(plane, request.model_name, request.model_version)
        timeout_s = context.time_remaining()  # the client's deadline, if it set one: it can only shorten ours
        # The message is charged to the memory budget already, for the whole call (interceptors.Guard).
        async with plane.open(entry, arrived, None if timeout_s is None else max(0.0, timeout_s)) as call:
            manifest = call.view.manifest  # the version admitted
            # Off the event loop: typed contents are converted value by value.
            parsed = await loop.run_in_executor(
                plane.decode_pool, parse_request, request, manifest, plane.settings.max_queue)
            if parsed.tensors is not None:
                results = await call.tensors(parsed.tensors)
            else:
                results = await call.images(parsed.images)
        logits = np.stack([r.logits for r in results])
        probs = np.stack([r.probs for r in results])
        return await loop.run_in_executor(
            plane.decode_pool, encode_response, request.id, entry.name, parsed.outputs, results[0].labels,
            logits, probs, results[0].version)

    # --- the model repository ------------------------------------------------------------
    @rpc(while_draining=True)  # a description, answered while draining as over HTTP
    async def RepositoryIndex(self, request, context):
        rows = await self.plane.index()
        if request.ready:
            rows = [r for r in rows if r.get("state") == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    @rpc()
    async def RepositoryModelLoad(self, request, context):
        await self.plane.load(_model_name(request.model_name))
        return pb.RepositoryModelLoadResponse()

    @rpc()
    async def RepositoryModelUnload(self, request, context):
        await self.plane.unload(_model_name(request.model_name))
        return pb.RepositoryModelUnloadResponse()


def _model_name(name: str) -> str:
    if not valid_name(name):
        raise BadRequest("not a valid model name (lowercase letters, digits, '.', '_', '-')")
    return name

