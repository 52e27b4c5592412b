"""EFFNET_API_KEY on every gRPC RPC the service implements, held to the HTTP side's policy RPC by RPC.

Each implemented RPC has an HTTP twin (app/api/grpc/servicer.py says which). With the key set, an RPC must
answer UNAUTHENTICATED exactly when its twin answers 401: without a key, with a wrong one, and with the right
one sent under a wrong name. Only the health probes are open, and only while their HTTP paths are in
EFFNET_API_KEY_EXEMPT (the README: "every RPC needs the key ... except ServerLive and ServerReady while
/v2/health is in EFFNET_API_KEY_EXEMPT"). With the key, every RPC works and says what HTTP says. A refused
load or unload changes nothing; a refused inference runs nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from serving_helpers import LiveServer, live_server
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from effnet_serve.core.config import Settings

KEY = "s3cret-k3y"
GOOD = [(("authorization", f"Bearer {KEY}"),), (("x-api-key", KEY),), (("authorization", f"bearer {KEY}"),)]
BAD = [None, (("authorization", "Bearer wrong"),), (("x-api-key", KEY.upper()),), (("authorization", KEY),),
       (("x-api-token", KEY),)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _infer_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="images", datatype="FP32", shape=[1, 3, 64, 64])
    req.raw_input_contents.append(np.zeros((1, 3, 64, 64), "<f4").tobytes())
    return req


def _infer_http() -> tuple[bytes, dict[str, str]]:
    raw = np.zeros((1, 3, 64, 64), "<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}


@dataclass
class Twin:
    rpc: str
    request: Callable[[], object]
    method: str
    path: str
    body: Callable[[], tuple[bytes, dict[str, str]]] = lambda: (b"", {})


# Every RPC the servicer implements, with its HTTP twin. Load/unload act on `tiny2`, which the server does not
# load at start (EFFNET_MODELS=tiny), so a refused call can be seen to have changed nothing.
TWINS = [
    Twin("ServerLive", pb.ServerLiveRequest, "GET", "/v2/health/live"),
    Twin("ServerReady", pb.ServerReadyRequest, "GET", "/v2/health/ready"),
    Twin("ServerMetadata", pb.ServerMetadataRequest, "GET", "/v2"),
    Twin("ModelReady", lambda: pb.ModelReadyRequest(name="tiny"), "GET", "/v2/models/tiny/ready"),
    Twin("ModelMetadata", lambda: pb.ModelMetadataRequest(name="tiny"), "GET", "/v2/models/tiny"),
    Twin("ModelConfig", lambda: pb.ModelConfigRequest(name="tiny"), "GET", "/v2/models/tiny/config"),
    Twin("ModelInfer", _infer_request, "POST", "/v2/models/tiny/infer", _infer_http),
    Twin("RepositoryIndex", pb.RepositoryIndexRequest, "POST", "/v2/repository/index"),
    Twin("RepositoryModelLoad", lambda: pb.RepositoryModelLoadRequest(model_name="tiny2"), "POST",
         "/v2/repository/models/tiny2/load"),
    Twin("RepositoryModelUnload", lambda: pb.RepositoryModelUnloadRequest(model_name="tiny2"), "POST",
         "/v2/repository/models/tiny2/unload"),
]
HEALTH = {"ServerLive", "ServerReady"}


def test_the_table_covers_every_rpc_the_servicer_implements():
    """A new RPC added to the servicer must be added here too, or this test says so."""
    from effnet_serve.api.grpc.servicer import InferenceServicer

    implemented = {name for name in vars(InferenceServicer) if re.match(r"^[A-Z]", name)}
    assert implemented == {t.rpc for t in TWINS}


@contextlib.contextmanager
def serve(repo: Path, **overrides) -> Iterator[tuple[LiveServer, service_pb2_grpc.GRPCInferenceServiceStub, httpx.Client]]:
    """tiny loaded at start; tiny2 in the repository for load/unload (explicit model control)."""
    settings = Settings(repository=repo, models=["tiny"], default_model="tiny", model_control="explicit", api_key=KEY,
                        threads=1, decode_workers=2, device="cpu", grpc_port=free_port(), **overrides)
    with live_server(settings) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.app.state.grpc.port}") as ch, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        yield srv, service_pb2_grpc.GRPCInferenceServiceStub(ch), http


def call_grpc(stub, twin: Twin, metadata) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, getattr(stub, twin.rpc)(twin.request(), metadata=metadata, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def call_http(http: httpx.Client, twin: Twin, metadata) -> httpx.Response:
    body, headers = twin.body()
    return http.request(twin.method, twin.path, content=body, headers={**headers, **dict(metadata or ())})


def counter(http: httpx.Client, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}{{{re.escape(want)}}} (\S+)$", http.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_every_rpc_needs_the_key_exactly_where_its_http_twin_does(tiny_family_repo):
    with serve(tiny_family_repo) as (srv, stub, http):
        load = next(t for t in TWINS if t.rpc == "RepositoryModelLoad")
        ok, _ = call_grpc(stub, load, GOOD[0])  # tiny2 loaded with the key, so a refused unload has something to undo
        assert ok == grpc.StatusCode.OK
        assert srv.plane.registry.entries["tiny2"].status == "ready"
        batches = srv.plane.registry.entries["tiny"].batcher.batches_run
        loads = counter(http, "effnet_model_loads_total", model="tiny2", outcome="ok")

        for twin in TWINS:
            for metadata in BAD:
                code, details = call_grpc(stub, twin, metadata)
                r = call_http(http, twin, metadata)
                if twin.rpc in HEALTH:  # open by default (EFFNET_API_KEY_EXEMPT has /v2/health), on both sides
                    assert code == grpc.StatusCode.OK and r.status_code == 200, (twin.rpc, metadata, code, r.status_code)
                else:
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (twin.rpc, metadata, code, details)
                    assert r.status_code == 401, (twin.path, metadata, r.status_code, r.text)
                    # in the V2 protocol's shape, as every /v2 error: KServe's clients decode `error` as a string
                    assert r.json() == {"error": "missing or wrong API key"}, r.text
                    assert KEY not in str(details) and KEY not in r.text  # the key is never echoed

        # Nothing refused had any effect: no reload, no unload, no inference.
        assert counter(http, "effnet_model_loads_total", model="tiny2", outcome="ok") == loads
        assert counter(http, "effnet_model_unloads_total", model="tiny2") == 0
        assert srv.plane.registry.entries["tiny2"].status == "ready"
        assert srv.plane.registry.entries["tiny"].batcher.batches_run == batches

        # With the key, under each accepted spelling, every RPC works and says what its HTTP twin says.
        for metadata in GOOD:
            answers = {}
            for twin in TWINS:
                code, answer = call_grpc(stub, twin, metadata)
                r = call_http(http, twin, metadata)
                assert code == grpc.StatusCode.OK, (twin.rpc, metadata, code, answer)
                assert r.status_code == 200, (twin.path, metadata, r.status_code, r.text)
                answers[twin.rpc] = (answer, r)
            meta, r = answers["ServerMetadata"]
            assert (meta.name, meta.version, list(meta.extensions)) == (r.json()["name"], r.json()["version"],
                                                                          r.json()["extensions"])
            assert answers["ModelReady"][0].ready and answers["ServerLive"][0].live
            meta, r = answers["ModelMetadata"]
            assert (meta.name, list(meta.versions)) == (r.json()["name"], r.json()["versions"])
            config, r = answers["ModelConfig"]
            assert (config.config.name, config.config.max_batch_size) == ("tiny", r.json()["max_batch_size"])
            assert list(config.config.input[0].dims) == r.json()["input"][0]["dims"] == [3, 64, 64]
            infer, r = answers["ModelInfer"]
            assert list(infer.outputs[0].shape) == [1, 1000] and len(infer.raw_output_contents[0]) == 4000
            index, r = answers["RepositoryIndex"]
            assert sorted(m.name for m in index.models) == sorted(row["name"] for row in r.json()) == ["tiny", "tiny2"]
        # The last accepted calls were tiny2's load, then its unload: they took effect.
        assert srv.plane.registry.entries["tiny2"].reason == "unloaded"
        assert counter(http, "effnet_model_unloads_total", model="tiny2") == 2 * len(GOOD)


@pytest.mark.parametrize("exempt", [[], ["/v2/health/live"], ["/v2/health/ready", "/metrics"]])
def test_the_health_rpcs_follow_the_exemptions_as_their_http_paths_do(tiny_family_repo, exempt):
    with serve(tiny_family_repo, api_key_exempt=exempt) as (_, stub, http):
        for twin in TWINS:
            code, details = call_grpc(stub, twin, None)
            r = call_http(http, twin, None)
            open_on_http = r.status_code != 401
            assert open_on_http == (code != grpc.StatusCode.UNAUTHENTICATED), (twin.rpc, exempt, code, r.status_code)
            # Open exactly when the twin's path is exempted (and only the health probes follow exemptions).
            assert open_on_http == any(twin.path == p for p in exempt), (twin.rpc, exempt, r.status_code)
