"""A batch of caption jobs, wherever the captioner lives: in the service's own process
(`api.services.CaptionService`) or in a process of its own (`api.model_process`).

    results = caption_batch(captioner, pixels, [(3, 20), (1, 20)], [False, True], listeners)

One encoder pass for the whole batch, then one batched search per distinct (beam_size,
max_length); the images of a streamed job tell `listeners` their words as the search fixes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from captioner.caption.captioner import Captioner
from captioner.caption.search import Watch, Word
from captioner.results import CaptionResult, CaptionWord


def groups(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Indices of equal keys, in first-seen order."""
    found: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        found.setdefault(key, []).append(index)
    return found


class Listeners:
    """Who hears the words of a batch of caption jobs: `words(row, [CaptionWord, ...])` for job
    `row` of the batch, and `wanted(row)`, asked after every step of its search."""

    def words(self, row: int, words: list[CaptionWord]) -> None:
        pass

    def wanted(self, row: int) -> bool:
        return True


class _Rows(Watch):
    """A search's watch over some rows of the batch: image i of the search is job `rows[i]`;
    only the words of streamed rows are told."""

    def __init__(
        self,
        captioner: Captioner,
        rows: Sequence[int],
        streamed: Sequence[bool],
        listeners: Listeners,
    ):
        self.captioner = captioner
        self.rows = rows
        self.streamed = streamed
        self.listeners = listeners

    def words(self, image: int, words: list[Word]) -> None:
        row = self.rows[image]
        if self.streamed[row]:
            self.listeners.words(row, [self.captioner.caption_word(w) for w in words])

    def wanted(self, image: int) -> bool:
        return self.listeners.wanted(self.rows[image])


def caption_batch(
    captioner: Captioner,
    pixels: torch.Tensor,
    options: Sequence[tuple[int, int]],
    streamed: Sequence[bool] = (),
    listeners: Listeners | None = None,
) -> list[CaptionResult]:
    """Captions of preprocessed images (B, 3, S, S), image b with `options[b]` = (beam_size,
    max_length): one encoder pass, then one batched search per distinct options. Searches with a
    `streamed` image tell `listeners` (rows are indices into the batch)."""
    with torch.inference_mode():
        features = captioner.encode(pixels)  # (B, L, D)
        results: list[CaptionResult | None] = [None] * len(options)
        for (beam_size, max_length), rows in groups(options).items():
            index = torch.tensor(rows, device=features.device)
            watch = None
            if listeners is not None and any(streamed[r] for r in rows):
                watch = _Rows(captioner, rows, streamed, listeners)
            decoded = captioner.caption_features(
                features.index_select(0, index),
                beam_size=beam_size,
                max_length=max_length,
                watch=watch,
            )
            for row, result in zip(rows, decoded, strict=True):
                results[row] = result
    return results  # type: ignore[return-value]
