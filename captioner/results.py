"""What the models return, and the one JSON shape of each: the CLI and the HTTP API print the same.

result.to_dict()                            # attention as {"height", "width", "maps": [T][h][w]}
result.to_dict(AttentionFormat.png, image)  # attention as base64 PNG heatmaps over `image`
result.to_dict(AttentionFormat.none)        # "attention": null
word.to_dict()                              # one word of a streamed caption (`CaptionWord`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from PIL import Image

from captioner.overlay import overlay_png_base64

DECIMALS = 6  # attention weights in JSON: enough to sum to 1 within 1e-5, a third of the digits


class AttentionFormat(str, Enum):
    none = "none"
    grid = "grid"
    png = "png"


def attention_payload(
    fmt: AttentionFormat | str, maps: np.ndarray | None, image: Image.Image | None = None
) -> dict[str, Any] | None:
    """`maps` (T, h, w) or (h, w) -> the attention object of the JSON, or None.

    `grid`: {"height", "width", "maps": [T][h][w]} with each map summing to 1 (rounded to 6
    decimals); `png`: {"height", "width", "overlays": [T base64 PNGs]} drawn over `image`.
    PNG encoding is CPU work: a server calls this in a worker thread.
    """
    fmt = AttentionFormat(fmt)
    if fmt is AttentionFormat.none or maps is None:
        return None
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"attention must be (T, h, w) or (h, w), got shape {maps.shape}")
    _, height, width = maps.shape
    if fmt is AttentionFormat.grid:
        return {"height": height, "width": width, "maps": np.round(maps, DECIMALS).tolist()}
    if image is None:
        raise ValueError("attention format png needs the image to draw the overlays on")
    overlays = [overlay_png_base64(image, m) for m in maps]
    return {"height": height, "width": width, "overlays": overlays}


@dataclass
class CaptionResult:
    caption: str
    tokens: list[str]
    token_logprobs: list[float]
    score: float
    attention: np.ndarray | None  # (len(tokens), h, w), each map sums to 1; None without attention
    model: dict[str, str] = field(default_factory=dict)  # {"name", "version"} of the captioner
    finished: bool = True  # False when the search was cut at max_length before `<end>`
    # How unlike the model's training images the image looks (`captioner.domain`); None for a
    # model folder without domain statistics.
    domain_score: float | None = None
    in_domain: bool | None = None

    def to_dict(
        self,
        attention: AttentionFormat | str = AttentionFormat.grid,
        image: Image.Image | None = None,
    ) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "score": self.score,
            "attention": attention_payload(attention, self.attention, image),
            "model": self.model,
            "finished": self.finished,
            "domain_score": self.domain_score,
            "in_domain": self.in_domain,
        }


@dataclass
class CaptionWord:
    """One word of a caption, told as soon as the search has fixed it (`Captioner.caption(...,
    watch=...)`); a caption's words are its `tokens`, log-probs and attention maps, in order."""

    index: int  # its place in the caption's tokens
    token: str
    logprob: float
    attention: np.ndarray | None  # (h, w), sums to 1; None without attention

    def to_dict(
        self,
        attention: AttentionFormat | str = AttentionFormat.grid,
        image: Image.Image | None = None,
    ) -> dict[str, Any]:
        """Attention as {"height", "width", "map": [h][w]} (grid, rounded as in `CaptionResult`)
        or {"height", "width", "overlay": base64 PNG} (png), or None."""
        fmt = AttentionFormat(attention)
        payload = attention_payload(fmt, self.attention, image)
        if payload is not None:  # its list of one map, as one map under the singular key
            plural, one = (
                ("maps", "map") if fmt is AttentionFormat.grid else ("overlays", "overlay")
            )
            [payload[one]] = payload.pop(plural)
        return {
            "index": self.index,
            "token": self.token,
            "logprob": self.logprob,
            "probability": math.exp(self.logprob),
            "attention": payload,
        }


@dataclass
class AnswerResult:
    question: str
    answer: str
    confidence: float
    top_answers: list[tuple[str, float]]
    attention: np.ndarray | None  # (G, h, w), each glimpse's map sums to 1; None without attention
    model: dict[str, str] = field(default_factory=dict)  # {"name", "version"} of the VQA model
    # The question's words the model's vocabulary lacks (read as `<unk>`), in order, each once.
    unknown_words: list[str] = field(default_factory=list)
    # False when no content word of the question is known: the answer ignores what was asked about.
    known_content_words: bool = True
    domain_score: float | None = None  # as in CaptionResult, for the question's image
    in_domain: bool | None = None

    def to_dict(
        self,
        attention: AttentionFormat | str = AttentionFormat.grid,
        image: Image.Image | None = None,
    ) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "confidence": self.confidence,
            "top_answers": [{"answer": a, "probability": p} for a, p in self.top_answers],
            "attention": attention_payload(attention, self.attention, image),
            "model": self.model,
            "unknown_words": self.unknown_words,
            "known_content_words": self.known_content_words,
            "domain_score": self.domain_score,
            "in_domain": self.in_domain,
        }
