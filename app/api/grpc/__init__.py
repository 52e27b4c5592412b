"""The Open Inference Protocol (KServe V2) over gRPC: Triton's `inference.GRPCInferenceService`, beside HTTP.

A thin front end over the same objects as the HTTP V2 routes (app/api/v2): the data plane runs every
inference (admission, limits, deadlines, metrics), app/api/v2/codec.py checks the input and picks the
outputs, app/api/v2/descriptions.py describes the server and its models. The service's messages and base
class come from tritonclient's generated modules (`tritonclient.grpc.service_pb2[_grpc]`).

    server.py     the grpc.aio server: started and stopped by the app's lifespan (EFFNET_GRPC_PORT; 0 = off)
    servicer.py   the RPCs
    tensors.py    ModelInferRequest -> tensors or images and outputs; answers -> ModelInferResponse
    status.py     errors as gRPC status codes, the API key as metadata
"""
