"""Peer: the hand-written FastAPI + ONNX Runtime server most users write first.

    python benchmarks/peers/fastapi_ort_server.py --model-dir models/b0 --port 8003

POST /predict, multipart/form-data with one image in the field `file` -> top-5 JSON
(`{"predictions": [{"index", "label", "score"}, ...]}`); GET /health -> {"status": "ok"}.
The same model.onnx in a plain `onnxruntime.InferenceSession` (default session options),
plain Pillow preprocessing from the manifest (common.py), batch 1, no batching.
The endpoint is `async def` with `file: UploadFile = File(...)` and `await file.read()`,
as in FastAPI's own docs and most ONNX/FastAPI tutorials, so decode, preprocess and
`session.run` block the event loop: one request at a time. One uvicorn process.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, File, UploadFile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
from common import load_model_dir, preprocess, top5  # noqa: E402


def create_app(model_dir: str) -> FastAPI:
    onnx_path, manifest = load_model_dir(model_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name, output_name = manifest["onnx"]["input"]["name"], manifest["onnx"]["output"]["name"]
    pp, labels = manifest["preprocess"], manifest["labels"]
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)):
        x = preprocess(await file.read(), pp)[np.newaxis]
        logits = session.run([output_name], {input_name: x})[0]
        return top5(logits[0], labels)

    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, default=8003)
    args = p.parse_args()
    uvicorn.run(create_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
