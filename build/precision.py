"""fp16 and int8 copies of a built model, shipped only when they still answer like fp32.

A derived model is its own entry in the repository (`lite0-fp16`, `lite0-int8`) so a client
picks it per request like any variant. It is made from the fp32 ONNX already in the
repository (no torch), and written only when two gates pass:

- top-1 on a labelled real-photo set, through `effnet eval`'s code path, is not lower than fp32's;
- on a few hundred inputs, its top-1 class equals fp32's for at least 99% of them.

Small photo sets are stretched to a few hundred inputs with seeded views (random crops and
flips of each photo, then the served resize and crop): a view is a different input to the
model, but not an independent photo, and the manifest records how many of each there were.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from effnet_serve.core.errors import ImageError
from effnet_serve.tools.eval import LabelResolver, evaluate, open_dataset
from effnet_serve.engine.manifest import Manifest, Preprocess, load_manifest, verify_onnx
from effnet_serve.engine.preprocess import normalise, open_image, prepare, resize_crop
from effnet_serve.engine.sessions import create_session
from .repository import ONNX_FILE, StagedModel, is_up_to_date, read_manifest, sha256_of

PRECISIONS = ("fp16", "int8")
MIN_AGREEMENT = 0.99
MIN_AGREEMENT_INPUTS = 200  # below this one flip moves agreement by more than half a point
AGREEMENT_INPUTS = 256
CALIBRATION_INPUTS = 96
MAX_VIEWS = 64
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 89_478_485  # Pillow's default bomb limit; these are the operator's own files

def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """AVX-512 VNNI, AVX-VNNI or AMX: int8 dot products accumulate in 32 bits, no 16-bit saturation."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


# Post-training quantization settings (ORT static, QDQ). reduce_range keeps weights to 7 bits, which only
# CPUs without VNNI need: their int8 kernels add pairs of u8*s8 products in 16 bits and saturate (that cost
# Lite0 a third of its agreement on the AVX2 machine measured before). With VNNI, 7-bit weights just lose
# precision: Lite0's agreement with fp32 went from 91.5% to 95.8% without them (make bench-precision sweeps
# the calibration choices: docs/benchmarks.md). The copy is made for the CPU it is built on; the manifest
# records the choice, so a copy built on a VNNI machine and served on an older one is rebuilt there.
INT8_SETTINGS = {
    "method": "onnxruntime.quantization.quantize_static",
    "format": "QDQ",
    "activations": "uint8",
    "weights": "int8",
    "per_channel": True,
    "reduce_range": not cpu_has_vnni(),
    "calibration": "MinMax",
}


class PrecisionError(Exception):
    """The derived model cannot be made or did not pass its gates; nothing was written."""

    def __init__(self, message: str, gate: "Gate | None" = None) -> None:
        super().__init__(message)
        self.gate = gate


@dataclass
class Gate:
    precision: str
    agreement: float
    inputs: int
    images: int
    views: int
    max_abs_diff: float
    top1_fp32: int
    top1_derived: int
    labelled: int
    dataset: str
    min_agreement: float = MIN_AGREEMENT

    @property
    def failures(self) -> list[str]:
        """Why this copy must not ship; empty when it passes."""
        out = []
        if self.labelled == 0:
            out.append(f"no labelled image in {self.dataset} could be scored")
        if self.top1_derived < self.top1_fp32:
            out.append(f"top-1 on {self.dataset} fell from {self.top1_fp32} to {self.top1_derived} of {self.labelled}")
        if self.inputs < MIN_AGREEMENT_INPUTS:
            out.append(f"agreement measured on only {self.inputs} inputs (at least {MIN_AGREEMENT_INPUTS}); "
                       "give --agreement-data with more photos")
        if self.agreement < self.min_agreement:
            out.append(f"top-1 agrees with fp32 on {self.agreement:.1%} of {self.inputs} inputs "
                       f"(at least {self.min_agreement:.0%})")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def at(self, min_agreement: float) -> "Gate":
        """The same measurements judged at another agreement threshold (the benchmark asks about 99%)."""
        return replace(self, min_agreement=min_agreement)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["agreement"] = round(self.agreement, 5)
        d["failures"] = self.failures
        d["passed"] = self.passed
        return d


@dataclass
class DerivedResult:
    name: str
    skipped: bool
    path: Path
    manifest: dict | None = None
    gate: Gate | None = None


def image_files(root: Path) -> list[Path]:
    """Every image file under root (or root itself), in a stable order."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise PrecisionError(f"{root} is not a folder or an image")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PrecisionError(f"no images under {root}")
    return files


def _random_view(img: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop of 35-100% of the area at aspect 3/4-4/3, flipped half the time."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.35, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = img.crop((x, y, x + cw, y + ch))
            break
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def views(files: list[Path], pp: Preprocess, target: int, seed: int) -> tuple[np.ndarray, int]:
    """At least `target` inputs (when MAX_VIEWS allows) from the files; returns (inputs, views per file).

    The first view of a file is exactly what the server feeds the model for it.
    """
    per_file = max(1, min(MAX_VIEWS, math.ceil(target / len(files))))
    rng = random.Random(seed)
    out: list[np.ndarray] = []
    for path in files:
        try:
            data = path.read_bytes()
            out.append(prepare(data, pp, MAX_PIXELS).tensor)
            if per_file > 1:
                img = open_image(data, MAX_PIXELS)
                out += [normalise(resize_crop(_random_view(img, rng), pp), pp) for _ in range(per_file - 1)]
        except (OSError, ImageError):
            continue  # an unreadable file among the operator's photos costs its inputs, not the build
    if not out:
        raise PrecisionError(f"none of the {len(files)} images could be read")
    return np.stack(out), per_file


def convert_fp16(src: Path, dst: Path) -> None:
    """Weights and arithmetic in fp16; inputs and outputs stay fp32 so the server's contract holds."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, input_name: str,
                  reduce_range: bool | None = None, method: str = "MinMax", extra: dict | None = None) -> None:
    """ORT static quantization; the defaults are INT8_SETTINGS, the rest is for make bench-precision's sweep."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = (calibration[i:i + 8] for i in range(0, len(calibration), 8))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))  # shape inference and graph cleanup ORT recommends first
        quantize_static(
            str(prepared), str(dst), Reader(),
            quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=INT8_SETTINGS["reduce_range"] if reduce_range is None else reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method), extra_options=extra or {},
        )


def _run(session, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([session.run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])


def _session(path: Path, manifest: Manifest, threads: int):
    return create_session(path, manifest.onnx.input.name, manifest.onnx.output.name,
                          device="cpu", threads=threads, spinning=False)


def _data_digest(paths: list[Path]) -> list:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def derived_name(base: str, precision: str) -> str:
    return f"{base}-{precision}"


def derive(
    repo: Path,
    base: str,
    precision: str,
    check_data: Path,
    *,
    agreement_data: Path | None = None,
    calibration_data: Path | None = None,
    name: str | None = None,
    min_agreement: float = MIN_AGREEMENT,
    force: bool = False,
    threads: int = 2,
    seed: int = 0,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> DerivedResult:
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}")
    if precision == "int8" and calibration_data is None:
        raise PrecisionError("int8 needs --calibration-data: a folder of images like the ones it will serve")
    name = name or derived_name(base, precision)
    if len(name) > 64:  # the manifest's limit on model names
        raise PrecisionError(f"{name!r} is longer than 64 characters; give the fp32 model a shorter --name")
    base_folder = repo / base
    base_manifest = load_manifest(base_folder)
    base_onnx = verify_onnx(base_folder, base_manifest)
    pp = base_manifest.preprocess

    agreement_files = image_files(agreement_data or check_data)
    calibration_files = image_files(calibration_data) if calibration_data else []
    digest = hashlib.sha256(json.dumps({
        "base_onnx": base_manifest.onnx.sha256, "precision": precision, "min_agreement": min_agreement,
        "int8": INT8_SETTINGS if precision == "int8" else None, "seed": seed,
        "code": sha256_of(Path(__file__)),
        "data": [_data_digest(agreement_files), _data_digest(calibration_files), str(check_data)],
    }, sort_keys=True).encode()).hexdigest()
    if not force and is_up_to_date(repo, name, digest):
        return DerivedResult(name, True, repo / name)

    staged = StagedModel(repo, name)
    try:
        onnx_path = staged.path / ONNX_FILE
        on_phase("convert")
        if precision == "fp16":
            convert_fp16(base_onnx, onnx_path)
        else:
            calibration, _ = views(calibration_files, pp, CALIBRATION_INPUTS, seed + 1)
            quantize_int8(base_onnx, onnx_path, calibration, base_manifest.onnx.input.name)
            del calibration

        on_phase("agreement")
        inputs, per_file = views(agreement_files, pp, AGREEMENT_INPUTS, seed)
        fp32_logits = _run(_session(base_onnx, base_manifest, threads), inputs)
        derived_logits = _run(_session(onnx_path, base_manifest, threads), inputs)
        agree = float(np.mean(fp32_logits.argmax(1) == derived_logits.argmax(1)))
        max_diff = float(np.abs(fp32_logits - derived_logits).max())
        del inputs

        manifest = _derived_manifest(base_folder, base_manifest, name, precision, onnx_path, digest, calibration_files)
        (staged.path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # for evaluate()

        on_phase("eval")
        dataset = open_dataset(check_data, LabelResolver(base_manifest.labels))
        fp32_eval = evaluate(base_folder, dataset, batch=8, threads=threads, progress=False)
        derived_eval = evaluate(staged.path, dataset, batch=8, threads=threads, progress=False)

        fp32_top1, derived_top1 = fp32_eval.tally.summary(), derived_eval.tally.summary()
        gate = Gate(
            precision=precision, agreement=agree, inputs=len(fp32_logits), images=len(agreement_files),
            views=per_file, max_abs_diff=max_diff, min_agreement=min_agreement,
            top1_fp32=fp32_top1["top1_correct"], top1_derived=derived_top1["top1_correct"],
            labelled=fp32_top1["size"], dataset=dataset.name,
        )
        if not gate.passed:
            raise PrecisionError(f"{name} not shipped: " + "; ".join(gate.failures), gate)

        manifest["onnx"]["parity"] = {"kind": "agreement_with_fp32", **gate.as_dict()}
        manifest["accuracy"]["measured"] = derived_eval.measured()
        on_phase("write")
        path = staged.commit(manifest)
    except BaseException:
        staged.discard()
        raise
    return DerivedResult(name, False, path, manifest, gate)


def _derived_manifest(base_folder: Path, base: Manifest, name: str, precision: str, onnx_path: Path, digest: str,
                      calibration_files: list[Path]) -> dict:
    """The fp32 manifest with what changed: name, precision, the ONNX file, where it came from."""
    import onnxruntime

    m = read_manifest(base_folder.parent, base_folder.name)  # the fp32 file as written, unknown fields included
    if m is None:
        raise PrecisionError(f"cannot read {base_folder / 'manifest.json'}")
    m["name"] = name
    m["precision"] = precision
    m["derived_from"] = {"name": base.name, "onnx_sha256": base.onnx.sha256}
    m["onnx"]["sha256"] = sha256_of(onnx_path)
    m["onnx"]["size_bytes"] = onnx_path.stat().st_size
    m["onnx"]["parity"] = None
    if precision == "int8":
        m["quantization"] = {**INT8_SETTINGS, "calibration_images": len(calibration_files)}
    # The published accuracy is the fp32 model's; kept, and said so, because the gate bounds the gap.
    if m["accuracy"].get("reference"):
        m["accuracy"]["reference"]["note"] = f"published for the fp32 weights; {precision} agrees with fp32 per onnx.parity"
    m["accuracy"]["measured"] = None
    build = dict(m.get("build") or {})
    build.update(inputs_digest=digest, onnxruntime_version=onnxruntime.__version__, derived=True)
    m["build"] = build
    return m


def remove_stale(repo: Path, name: str, base: str) -> bool:
    """After a failed derivation: drop an older derived copy made from another fp32 file, so the
    repository never serves a copy whose gate was passed against a model that is gone."""
    current = read_manifest(repo, name)
    base_manifest = read_manifest(repo, base)
    if not current or not current.get("derived_from") or not base_manifest:
        return False
    if current["derived_from"].get("onnx_sha256") == base_manifest["onnx"]["sha256"]:
        return False
    shutil.rmtree(repo / name, ignore_errors=True)
    return True
