"""The manifest.json contract (docs/manifest.md) as a validated pydantic model.

Only what the server relies on is strict; unknown fields are kept (`extra="allow"`) so a
newer build step can add facts without breaking an older server.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Match it whole (re.fullmatch): Python's "$" also matches before a trailing newline. pydantic's `pattern=`
# runs Rust's regex engine, where "$" is the end of the text only, so the manifest fields below are safe.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
MANIFEST_FILE = "manifest.json"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Preprocess(_Open):
    resize: int = Field(ge=1, le=4096)
    crop: int = Field(ge=1, le=4096)
    interpolation: Literal["bicubic", "bilinear", "nearest"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @model_validator(mode="after")
    def _check(self) -> "Preprocess":
        if self.crop > self.resize:
            raise ValueError("preprocess.crop must not exceed preprocess.resize")
        if any(s <= 0 for s in self.std):
            raise ValueError("preprocess.std must be positive")
        return self


class Weights(_Open):
    source: str
    sha256: str | None = None
    pretrained: bool


class ReferenceAccuracy(_Open):
    top1: float
    top5: float | None = None
    dataset: str | None = None
    source: str | None = None


class MeasuredAccuracy(_Open):
    top1: float
    top5: float | None = None
    top1_ci95: float | list[float] | None = None
    top5_ci95: float | list[float] | None = None
    dataset: str | None = None
    size: int | None = None
    date: str | None = None


class Accuracy(_Open):
    reference: ReferenceAccuracy | None = None
    measured: MeasuredAccuracy | None = None


class TensorSpec(_Open):
    name: str
    shape: list[int | str]
    dtype: Literal["float32"]


class OnnxInfo(_Open):
    file: str = Field(pattern=r"^[A-Za-z0-9._-]+$")  # a bare file name: never a path out of the folder
    opset: int = Field(ge=17)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: TensorSpec
    output: TensorSpec
    parity: dict | None = None


class DerivedFrom(_Open):
    name: str
    onnx_sha256: str


class Manifest(_Open):
    schema_version: Literal[1]
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    family: str
    variant: str
    phi: float | None = None
    width_mult: float
    depth_mult: float
    resolution: int = Field(ge=1)
    dropout: float | None = None
    preprocess: Preprocess
    params: int = Field(ge=0)
    macs: int = Field(ge=0)
    weights: Weights
    accuracy: Accuracy = Field(default_factory=Accuracy)
    onnx: OnnxInfo
    labels: list[str] = Field(min_length=1)
    build: dict | None = None
    # fp16/int8 copies made by `effnet build --precision` from an fp32 model (docs/manifest.md).
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    derived_from: DerivedFrom | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        shape = self.onnx.input.shape
        if len(shape) != 4 or shape[1] != 3 or shape[2] != self.preprocess.crop or shape[3] != self.preprocess.crop:
            raise ValueError("onnx.input.shape must be [batch, 3, crop, crop]")
        out = self.onnx.output.shape
        if len(out) != 2 or out[1] != len(self.labels):
            raise ValueError("onnx.output.shape must be [batch, len(labels)]")
        return self


class ManifestError(Exception):
    """The model folder cannot be served; the message is safe to show in /models."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{MANIFEST_FILE} is missing") from None
    except OSError:
        raise ManifestError(f"{MANIFEST_FILE} cannot be read") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError: say what, not which Python class
        raise ManifestError(f"{MANIFEST_FILE} is not valid UTF-8 JSON") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "manifest"
        raise ManifestError(f"{MANIFEST_FILE} is invalid at {where}: {first.get('msg')}") from None


def verify_onnx(folder: Path, manifest: Manifest) -> Path:
    """The ONNX file must exist and match the manifest's sha256; returns its path."""
    path = folder / manifest.onnx.file
    if not path.is_file():
        raise ManifestError(f"{manifest.onnx.file} is missing")
    digest = sha256_file(path)
    if digest != manifest.onnx.sha256:
        raise ManifestError(f"{manifest.onnx.file} sha256 {digest[:12]}… does not match the manifest's {manifest.onnx.sha256[:12]}…")
    return path
