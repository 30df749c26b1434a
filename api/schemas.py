"""Request and response bodies; the field names are the HTTP contract in DESIGN.md."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    name: str
    version: str


class GridAttention(_Strict):
    height: int
    width: int
    maps: list[list[list[float]]] = Field(
        description="[T][height][width] attention weights; each map sums to 1"
    )


class PngAttention(_Strict):
    height: int
    width: int
    overlays: list[str] = Field(description="T base64-encoded PNG heatmaps over the image")


Attention = GridAttention | PngAttention | None
DomainScore = Annotated[
    float | None,
    Field(
        description="how unlike the model's training images the image looks to its encoder "
        "(Mahalanobis distance of the pooled features, ~1 for a typical training image); null "
        "when the model folder has no domain statistics"
    ),
]
InDomain = Annotated[
    bool | None,
    Field(
        description="false when domain_score is above the model's threshold: the image is unlike "
        "what the model was trained on (GET /models says what that is), so its output is "
        "unreliable; null without domain statistics"
    ),
]


class CaptionResponse(_Strict):
    caption: str
    tokens: list[str]
    token_logprobs: list[float]
    score: float = Field(
        description="the search's score: the sum of token_logprobs, length-penalised"
    )
    attention: Attention = Field(description="null for attention=none or a model without attention")
    model: ModelRef
    domain_score: DomainScore
    in_domain: InDomain


class CaptionBatchResponse(_Strict):
    results: list[CaptionResponse] = Field(description="one result per image, in upload order")


class AnswerProbability(_Strict):
    answer: str
    probability: float


class VQAResponse(_Strict):
    question: str
    answer: str
    confidence: float
    top_answers: list[AnswerProbability]
    attention: Attention = Field(description="one map per attention glimpse (usually one)")
    model: ModelRef
    domain_score: DomainScore
    in_domain: InDomain


class ErrorResponse(_Strict):
    detail: str


class HealthResponse(_Strict):
    status: str


class ReadyResponse(_Strict):
    status: str
    models: dict[str, str] = Field(description="each configured model and its state")


class ModelInfo(BaseModel):
    """What `metadata()` of a loaded model says; VQA models add their own fields."""

    model_config = ConfigDict(extra="allow")
    kind: str
    name: str
    version: str
    encoder: str | None = None
    decoder: str | None = None
    vocabulary_size: int | None = None
    attention_grid: list[int] | None = None
    training_data: Any = None
    metrics: Any = None


class ModelsResponse(_Strict):
    models: list[ModelInfo]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "a request body that is not valid multipart/form-data",
        401: "missing or wrong API key",
        413: "upload over the byte or pixel cap",
        415: "not a decodable image",
        422: "bad parameters",
        503: "queue full or model not loaded (see Retry-After)",
        504: "the request outlived its timeout",
    }.items()
}
