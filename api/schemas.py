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
    finished: bool = Field(
        description="false when the caption was cut at max_length before the model ended it: "
        "the caption is unfinished (it may end in 'and' or ','); true when the model ended it. "
        "A caption of exactly max_length words is false: the search stops before the model "
        "can end it"
    )
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
    unknown_words: list[str] = Field(
        description="the question's words (punctuation aside) that are not in the model's "
        "question vocabulary, in question order, each once; the model reads each as <unk>, "
        "i.e. it does not see them at all"
    )
    known_content_words: bool = Field(
        description="false when none of the question's content words (words other than "
        "question words, articles, pronouns, auxiliaries, prepositions, conjunctions and "
        "quantifiers) is known to the model: the question is still answered, but the answer "
        "cannot depend on what it asks about, so treat it as a guess whatever its confidence"
    )
    domain_score: DomainScore
    in_domain: InDomain


class ErrorResponse(_Strict):
    detail: str


class HealthResponse(_Strict):
    status: str


class ReadyResponse(_Strict):
    status: str
    models: dict[str, str] = Field(description="each configured model and its state")


Metrics = dict[str, float | dict[str, float | None] | None]


class CardData(_Strict):
    description: str = Field(description="the training data, in plain words")
    command: str | None = Field(description="the command that made the training data")
    sizes: dict[str, int] = Field(description="e.g. train_images, train_questions")


class CardTraining(_Strict):
    command: str | None = Field(description="the training command")
    wall_time_s: float | None
    device: str | None


class CardValidation(_Strict):
    epoch: int | None
    metrics: Metrics = Field(description="the validation figures of the saved weights")


class CardTest(_Strict):
    data: str = Field(description="the test split, in plain words")
    command: str = Field(description="the command(s) that measured these figures")
    metrics: Metrics


class CardWordVectors(_Strict):
    source: str = Field(
        description="the vectors: a packaged source's name (glove-6b-50d) or a file"
    )
    dim: int = Field(description="their width, the word embedding's")
    vectors: int = Field(description="how many words the source has vectors for")
    rows_from_vectors: int = Field(
        description="vocabulary words whose embedding started as their vector"
    )
    vector_words: int | None = Field(
        description="a VQA model's question vocabulary also holds this many of the vectors' "
        "most frequent words, so words unseen in training are not <unk>; null for a captioner"
    )
    frozen: bool = Field(description="whether training kept the rows as given")


class ModelCardResponse(_Strict):
    """A model folder's card.json (captioner/card.py): what the model knows and its limits."""

    card_format: int
    kind: str
    summary: str = Field(description="one line: what the model does, on what images")
    domain: str = Field(description="what it was trained on, in plain words")
    intended_use: str
    limitations: list[str]
    data: CardData
    training: CardTraining
    vocabulary_size: int = Field(
        description="the vocabulary's tokens, its 4 special tokens (<pad> <start> <end> <unk>) included"
    )
    answers: int | None = Field(description="a VQA model's answer-set size; null for a captioner")
    validation: CardValidation | None
    tests: list[CardTest] = Field(description="test figures, each with its data and command")
    word_vectors: CardWordVectors | None = Field(
        default=None,
        description="the pretrained word vectors the embedding started from; null: none",
    )


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
    card: ModelCardResponse | None = Field(
        default=None, description="the model card: also at GET /models/{name}/card"
    )


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

STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": '`text/event-stream`: `event: word` with data `{"index": int, '
        '"token": str, "logprob": float, "probability": float, "attention": null | '
        '{"height", "width", "map": [h][w]} | {"height", "width", "overlay": '
        "base64 PNG}}` per word, in order, as the search fixes it; then `event: result` with the "
        "body `POST /caption` returns; or, after the first event, `event: error` with "
        '`{"detail": str, "status": int}`',
        # Each event (OpenAPI 3.2, "Special Considerations for Server-Sent Events"): its data is
        # JSON text, described above.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "event": {"type": "string", "enum": ["word", "result", "error"]},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                    "required": ["event", "data"],
                }
            }
        },
    },
}
