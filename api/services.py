"""The loaded models behind the routes, each with its own micro-batcher.

`CaptionService.run_batch` stacks every waiting image into one encoder pass, then decodes in one
batched beam search per distinct (beam_size, max_length) (`api.caption_work.caption_batch`), in
this process or, with `Settings.model_process`, in the captioner's own (`api.model_process`);
each image's domain score comes from the same features. A streamed caption's job carries its
`CaptionStream`, which hears its image's words from that same search. `VQAService.run_batch`
goes through the answerer's own feature cache (`Answerer.image_memory`: cached images cost
nothing, each distinct new image is encoded once), then answers in one pass per distinct top_k.
Both run in the batcher's worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from captioner.caption.captioner import Captioner
from captioner.results import AnswerResult, CaptionResult, CaptionWord
from captioner.vqa.answerer import Answerer

from .batching import MicroBatcher
from .caption_work import Listeners, caption_batch, groups
from .model_process import CaptionerProcess
from .prometheus import Metrics
from .settings import Settings
from .streaming import CaptionStream


def _batcher(name: str, run_batch, settings: Settings, metrics: Metrics) -> MicroBatcher:
    return MicroBatcher(
        name,
        run_batch,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_batch_delay_s,
        max_queue=settings.max_queue,
        metrics=metrics,
    )


@dataclass(frozen=True)
class CaptionJob:
    pixels: torch.Tensor  # (3, S, S)
    beam_size: int
    max_length: int
    stream: CaptionStream | None = None  # a streamed caption: hears its words


class _Streams(Listeners):
    """The streams of a batch's jobs (None for a job nobody streams)."""

    def __init__(self, jobs: Sequence[CaptionJob]):
        self.streams = [job.stream for job in jobs]

    def words(self, row: int, words: list[CaptionWord]) -> None:
        stream = self.streams[row]
        if stream is not None:
            stream.words(words)

    def wanted(self, row: int) -> bool:
        stream = self.streams[row]
        return stream is None or not stream.stopped


class CaptionService:
    """The captioner behind the routes: in this process (`captioner`), or with
    `settings.model_process` in a process of its own (`api.model_process`), which the event
    loop's Python never holds up."""

    name = "captioner"

    def __init__(self, model: Captioner | CaptionerProcess, settings: Settings, metrics: Metrics):
        self.model = model
        self.batcher: MicroBatcher[CaptionJob, CaptionResult] = _batcher(
            self.name, self.run_batch, settings, metrics
        )

    @property
    def input_size(self) -> int:
        return self.model.input_size

    def model_ref(self) -> dict[str, str]:
        return {"name": self.model.name, "version": self.model.version}

    def metadata(self) -> dict[str, Any]:
        return self.model.metadata()

    def run_batch(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        pixels = torch.stack([job.pixels for job in jobs])
        options = [(job.beam_size, job.max_length) for job in jobs]
        streamed = [job.stream is not None for job in jobs]
        listeners = _Streams(jobs) if any(streamed) else None
        if isinstance(self.model, Captioner):
            return caption_batch(self.model, pixels, options, streamed, listeners)
        return self.model.caption_batch(pixels, options, streamed, listeners)

    async def caption(
        self, pixels: Sequence[torch.Tensor], beam_size: int, max_length: int
    ) -> list[tuple[CaptionResult, int]]:
        """Captions for preprocessed images, with the size of the batch each one ran in."""
        jobs = [CaptionJob(p, beam_size, max_length) for p in pixels]
        return await self.batcher.submit_many(jobs)

    async def caption_streamed(
        self, pixels: torch.Tensor, beam_size: int, max_length: int, stream: CaptionStream
    ) -> tuple[CaptionResult, int]:
        """One image's caption, its words told to `stream` as the search fixes them."""
        return await self.batcher.submit(CaptionJob(pixels, beam_size, max_length, stream))

    async def close(self) -> None:
        await self.batcher.close()
        if not isinstance(self.model, Captioner):
            await run_in_threadpool(self.model.close)


@dataclass(frozen=True)
class VQAJob:
    data: bytes  # the upload: its feature cache key is computed in the worker thread
    pixels: torch.Tensor  # (3, S, S)
    question: str
    top_k: int


class VQAService:
    name = "vqa"

    def __init__(self, answerer: Answerer, settings: Settings, metrics: Metrics):
        self.answerer = answerer
        metrics.watch_cache(self.name, answerer.cache)
        self.batcher: MicroBatcher[VQAJob, AnswerResult] = _batcher(
            self.name, self.run_batch, settings, metrics
        )

    @property
    def input_size(self) -> int:
        return self.answerer.input_size

    def model_ref(self) -> dict[str, str]:
        return {"name": self.answerer.name, "version": self.answerer.version}

    def metadata(self) -> dict[str, Any]:
        return self.answerer.metadata()

    def run_batch(self, jobs: list[VQAJob]) -> list[AnswerResult]:
        """The answerer's own path: its feature cache, then one pass per distinct top_k."""
        with torch.inference_mode():
            keys = [self.answerer.image_key(job.data) for job in jobs]
            # (B, L, M), and each image's domain score (computed when it was encoded) or None
            memory, scores = self.answerer.image_memory(keys, lambda i: jobs[i].pixels)
            results: list[AnswerResult | None] = [None] * len(jobs)
            for top_k, rows in groups([job.top_k for job in jobs]).items():
                index = torch.tensor(rows, device=memory.device)
                answers = self.answerer.answer_features(
                    memory.index_select(0, index),
                    [jobs[r].question for r in rows],
                    top_k,
                    domain_scores=None if scores is None else [scores[r] for r in rows],
                )
                for row, answer in zip(rows, answers, strict=True):
                    results[row] = answer
        return results  # type: ignore[return-value]

    async def answer(
        self, data: bytes, pixels: torch.Tensor, question: str, top_k: int
    ) -> tuple[AnswerResult, int]:
        return await self.batcher.submit(VQAJob(data, pixels, question, top_k))

    async def close(self) -> None:
        await self.batcher.close()
