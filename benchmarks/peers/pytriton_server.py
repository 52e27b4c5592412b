"""Peer: Triton Inference Server through PyTriton, ONNX Runtime inside the bound Python function.

    bash benchmarks/peers/setup_pytriton.sh      # once: .cache/peers/pytriton-venv (numpy<2)
    .cache/peers/pytriton-venv/bin/python benchmarks/peers/pytriton_server.py \
        --model-dir models/b0 --port 8004        # HTTP 8004, gRPC 8005, metrics 8006

Triton speaks KServe V2, not multipart: POST /v2/models/<name>/infer (name = the manifest's,
e.g. `b0`) with one BYTES input `images` of shape [N, 1], each element an encoded image (the
same JPEG bytes as the other peers get), sent as binary tensor data (JSON header +
4-byte-length-prefixed element, `Inference-Header-Content-Length`: payloads.v2_binary_body;
JPEG bytes are not UTF-8, so JSON `data` strings cannot carry them). The output `predictions` is BYTES
[N, 1]: one top-5 JSON document per image (`{"predictions": [{"index", "label", "score"}]}`).
GET /v2/health/ready -> 200 when the model is loaded.

Triton's dynamic batcher: max batch 8, max_queue_delay 5 ms (as the other peers). The infer
function decodes + preprocesses with plain Pillow (common.py) and runs a default-options
`onnxruntime.InferenceSession`. Triton and its Python stub are child processes: stop the
server by killing its process group.

The LD_LIBRARY_PATH fix: Triton's python-backend stub for 3.11 links `libpython3.11.so.1.0`
dynamically. Without help the loader finds the system one (Debian's 3.11.2) while the stub
imports the stdlib of the interpreter running this script (pyenv's 3.11.7), and 3.11.7's
`multiprocessing.resource_tracker` calls `RLock._recursion_count`, which 3.11.2's C core lacks:
model load fails with `AttributeError: '_thread.RLock' object has no attribute
'_recursion_count'`. Putting this interpreter's own LIBDIR first on LD_LIBRARY_PATH (done
below, before Triton starts; PyTriton appends its own libraries after it) makes the stub
load the matching libpython.
"""

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
from common import load_model_dir, preprocess, top5  # noqa: E402

libdir = sysconfig.get_config_var("LIBDIR")
if libdir and libdir not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
    os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, default=8004, help="HTTP; gRPC and metrics take the next two")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    args = p.parse_args()

    onnx_path, manifest = load_model_dir(args.model_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name, output_name = manifest["onnx"]["input"]["name"], manifest["onnx"]["output"]["name"]
    pp, labels = manifest["preprocess"], manifest["labels"]

    @batch
    def infer(images: np.ndarray) -> dict:  # images: object array [N, 1] of bytes
        x = np.stack([preprocess(bytes(row[0]), pp) for row in images])
        logits = session.run([output_name], {input_name: x})[0]
        answers = [json.dumps(top5(row, labels)).encode() for row in logits]
        return {"predictions": np.array(answers, dtype=np.object_).reshape(-1, 1)}

    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                          grpc_port=args.port + 1, metrics_port=args.port + 2)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=manifest["name"],
            infer_func=infer,
            inputs=[Tensor(name="images", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="predictions", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=int(args.max_delay_ms * 1000))),
        )
        triton.serve()


if __name__ == "__main__":
    main()
