"""Response bodies, so that the OpenAPI spec describes exactly what the service sends."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    index: int = Field(description="class index (logit position)", examples=[281])
    label: str = Field(examples=["tabby"])
    score: float = Field(ge=0, le=1, description="softmax probability", examples=[0.62])


class Timing(BaseModel):
    """Milliseconds. decode/preprocess are summed over the images; queue/inference are the
    slowest image's; total is the whole request as seen by the handler."""

    decode: float
    preprocess: float
    queue: float
    inference: float
    total: float


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["lite0"])
    pretrained: bool
    predictions: list[Prediction] | list[list[Prediction]] = Field(
        description="highest score first; a list of lists (one per image, in upload order) "
        "when the request was multipart with more than one `file` field",
    )
    timing_ms: Timing
    routing: dict | None = Field(
        None, description="model=auto only: {chosen, budget_ms, estimated_p95_ms, reason, ...}",
    )
    cascade: dict | None = Field(
        None, description="model=cascade only: {path, escalated, top1_scores, ...} (a list when several images)",
    )


class PreprocessInfo(BaseModel):
    resize: int
    crop: int
    interpolation: str
    mean: list[float]
    std: list[float]


class AccuracyInfo(BaseModel):
    reference: dict | None = None
    measured: dict | None = None


class ModelInfo(BaseModel):
    name: str
    status: Literal["loading", "ready", "unavailable"]
    reason: str | None = Field(None, description="why the model is not ready")
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
    precision: Literal["fp32", "fp16", "int8"] | None = Field(
        None, description="fp16/int8 are copies of an fp32 model that passed the build's agreement gate")
    derived_from: str | None = Field(None, description="the fp32 model this copy was made from")
    provider: str | None = None
    max_batch: int | None = None
    batch_sizes: list[int] | None = None


class ModelList(BaseModel):
    default: str | None
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["alive", "ready"]
    models: list[str] = Field(default_factory=list)
