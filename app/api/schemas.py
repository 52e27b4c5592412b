"""Response bodies, so that the OpenAPI spec describes exactly what the service sends."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    index: int = Field(description="class index (logit position)", examples=[281])
    label: str = Field(examples=["tabby"])
    score: float = Field(ge=0, le=1, description="softmax probability", examples=[0.62])


class Timing(BaseModel):
    """Milliseconds, for one image: decode, preprocess, waiting for its batch, and the batch's inference
    run (cascades: summed over the models the image went through); total is the whole request."""

    decode: float
    preprocess: float
    queue: float
    inference: float
    total: float


class ImageAnswer(BaseModel):
    model: str = Field(description="the model that answered this image (in a cascade: the last one it reached)")
    predictions: list[Prediction] = Field(description="highest score first")
    timing_ms: Timing
    cascade: dict | None = Field(
        None, description="model=cascade only: {path, escalated, top1_scores[, escalation_skipped]}",
    )


class ClassifyResponse(BaseModel):
    """The same shape for one image and for many: one entry in `results` per image, in upload order."""

    model: str = Field(examples=["lite0"], description="the model asked for (auto: the one chosen; "
                       "a cascade: `cascade:a,b`)")
    pretrained: bool
    results: list[ImageAnswer]
    routing: dict | None = Field(
        None, description="model=auto only: {chosen, budget_ms, estimated_p95_ms, reason, considered[, refused]}",
    )
    cascade: dict | None = Field(None, description="model=cascade only: {models, threshold}")


class PreprocessInfo(BaseModel):
    resize: int
    crop: int
    interpolation: str
    mean: list[float]
    std: list[float]


class AccuracyInfo(BaseModel):
    reference: dict | None = None
    measured: dict | None = None


class LatencyInfo(BaseModel):
    """The service's own recent per-image times for a model (decode + preprocess + inference, no queueing):
    the samples `model=auto` prices it by."""

    p50_ms: float | None = Field(None, description="median; null until there are enough recent samples")
    p95_ms: float | None = None
    samples: int = Field(description="recent images the percentiles are over (the last 100, at most a minute old)")


class ModelInfo(BaseModel):
    name: str
    status: Literal["loading", "ready", "unavailable"]
    reason: str | None = Field(None, description="why the model is not ready (\"unloaded\": stopped on request); "
                               "when ready, why its files on disk failed to load (the version shown serves on)")
    version: str | None = Field(None, description="changes whenever the model's ONNX file changes (its sha256, 12 hex digits)")
    family: str | None = None
    variant: str | None = None
    phi: float | None = None
    width_mult: float | None = None
    depth_mult: float | None = None
    resolution: int | None = None
    preprocess: PreprocessInfo | None = None
    params: int | None = None
    macs: int | None = None
    accuracy: AccuracyInfo | None = None
    pretrained: bool | None = None
    weights_source: str | None = None
    weights_format: str | None = Field(None, description="torchvision, efficientnet_pytorch, efficientnet_lite or random")
    padding: Literal["symmetric", "same"] | None = Field(None, description="same: TensorFlow's SAME padding")
    precision: Literal["fp32", "fp16", "int8"] | None = Field(
        None, description="fp16/int8 are copies of an fp32 model that passed the build's agreement gate")
    derived_from: str | None = Field(None, description="the fp32 model this copy was made from")
    provider: str | None = None
    max_batch: int | None = None
    batch_sizes: list[int] | None = None
    latency: LatencyInfo | None = Field(None, description="serving models only")


class ModelList(BaseModel):
    default: str | None
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["alive", "ready"]
    models: list[str] = Field(default_factory=list, description="the models that serve")
    unavailable: dict[str, str] | None = Field(
        None, description="models that do not serve, and why, when the server is ready without them "
                          "(EFFNET_STRICT_READINESS unset or false)")
    building: list[str] | None = Field(
        None, description="models a running `effnet build` has still to write into the repository; with "
                          "EFFNET_MODEL_CONTROL=poll each one serves once it lands (`make serve` does this)")
