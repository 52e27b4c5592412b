"""ONNX export with a dynamic batch axis, and the parity checks that gate a build."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .efficientnet import EfficientNet

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# ORT vs PyTorch, relative to the logits' scale: fp32 kernels differ in summation order, never more.
PARITY_BOUND = 1e-4
PARITY_BATCH = 4


class ExportError(RuntimeError):
    pass


@dataclass
class Parity:
    max_abs_diff: float
    max_rel_diff: float
    logit_scale: float
    batch_consistency_max_abs_diff: float
    batch_size: int

    def as_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "logit_scale": self.logit_scale,
            "batch_consistency_max_abs_diff": self.batch_consistency_max_abs_diff,
            "batch_size": self.batch_size,
            "bound": PARITY_BOUND,
        }


def export_onnx(model: EfficientNet, crop: int, path: Path) -> None:
    model.eval()
    example = torch.randn(2, 3, crop, crop)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: batch}},
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    _check_signature(onnx_model, crop)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_signature(onnx_model: onnx.ModelProto, crop: int) -> None:
    (inp,) = onnx_model.graph.input
    (out,) = onnx_model.graph.output
    in_dims, out_dims = _dims(inp), _dims(out)
    if inp.name != INPUT_NAME or out.name != OUTPUT_NAME:
        raise ExportError(f"unexpected tensor names {inp.name}/{out.name}")
    if not isinstance(in_dims[0], str) or in_dims[1:] != [3, crop, crop]:
        raise ExportError(f"input shape {in_dims}, expected [batch, 3, {crop}, {crop}]")
    if not isinstance(out_dims[0], str) or out_dims[1:] != [1000]:
        raise ExportError(f"output shape {out_dims}, expected [batch, 1000]")


def check_parity(model: EfficientNet, onnx_path: Path, crop: int, seed: int = 0) -> Parity:
    """ORT vs PyTorch on one random batch, and ORT batch-1 vs batch-N on the same images."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(PARITY_BATCH, 3, crop, crop, generator=gen)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 0
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    batched = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    singles = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 1].numpy()})[0] for i in range(len(x))])

    scale = float(np.abs(ref).max())
    max_abs = float(np.abs(batched - ref).max())
    parity = Parity(
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / scale if scale else float("inf"),
        logit_scale=scale,
        batch_consistency_max_abs_diff=float(np.abs(batched - singles).max()),
        batch_size=PARITY_BATCH,
    )
    if scale < 1e-3:
        raise ExportError(f"logits are degenerate (max |logit| {scale:.1e}); the parity check would mean nothing")
    bound = PARITY_BOUND * max(1.0, scale)
    if max_abs > bound:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {max_abs:.2e} (bound {bound:.1e})")
    if parity.batch_consistency_max_abs_diff > bound:
        raise ExportError(f"batch-1 and batch-{PARITY_BATCH} outputs differ by {parity.batch_consistency_max_abs_diff:.2e}")
    return parity
