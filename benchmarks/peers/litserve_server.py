"""Peer: a LitServe server as a typical user writes it (about 40 lines).

    python benchmarks/peers/litserve_server.py --model-dir models/b0 --port 8002

POST /predict, multipart/form-data with one image in the field `file` -> top-5 JSON
(`{"predictions": [{"index", "label", "score"}, ...]}`); GET /health -> `ok`.
The same model.onnx as the service, in a plain `onnxruntime.InferenceSession` with
default session options; plain Pillow preprocessing from the manifest (common.py).
LitServe's dynamic batching: max batch 8, batch_timeout 5 ms (the service's default
EFFNET_MAX_DELAY_MS is 5 ms too); accelerator="cpu", one inference worker by default (--workers N: N), one API
server. LitServe starts child processes: stop it by killing its process group.
"""

import argparse
import sys
from pathlib import Path

import litserve as ls
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
from common import load_model_dir, preprocess, top5  # noqa: E402


class EfficientNetAPI(ls.LitAPI):
    def __init__(self, model_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device):
        onnx_path, manifest = load_model_dir(self.model_dir)
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.pp, self.labels = manifest["preprocess"], manifest["labels"]
        self.input_name, self.output_name = manifest["onnx"]["input"]["name"], manifest["onnx"]["output"]["name"]

    def decode_request(self, request):
        return preprocess(request["file"].file.read(), self.pp)  # np [3, H, W]; LitServe stacks them

    def predict(self, x):
        return self.session.run([self.output_name], {self.input_name: x})[0]  # [N, 1000]

    def encode_response(self, output):
        return top5(output, self.labels)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    p.add_argument("--workers", type=int, default=1, help="inference workers (LitServe's workers_per_device)")
    args = p.parse_args()
    api = EfficientNetAPI(args.model_dir, max_batch_size=args.max_batch, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
