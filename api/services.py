"""The loaded models behind the routes, each with its own micro-batcher.

`CaptionService.run_batch` stacks every waiting image into one encoder pass, then decodes in one
batched beam search per distinct (beam_size, max_length). `VQAService.run_batch` looks image
features up in a content-keyed `FeatureCache` first, encodes only the images it has not seen (each
distinct image once), then answers in one pass per distinct top_k. Both run in the batcher's worker
thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from captioner.pipeline import Captioner, CaptionResult

from .batching import MicroBatcher
from .metrics import Metrics
from .settings import Settings


def _groups(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Indices of equal keys, in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups


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


class CaptionService:
    name = "captioner"

    def __init__(self, captioner: Captioner, settings: Settings, metrics: Metrics):
        self.captioner = captioner
        self.batcher: MicroBatcher[CaptionJob, CaptionResult] = _batcher(
            self.name, self.run_batch, settings, metrics
        )

    @property
    def input_size(self) -> int:
        return self.captioner.input_size

    def model_ref(self) -> dict[str, str]:
        return {"name": self.captioner.name, "version": self.captioner.version}

    def metadata(self) -> dict[str, Any]:
        return self.captioner.metadata()

    def run_batch(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        with torch.inference_mode():
            features = self.captioner.encode(torch.stack([job.pixels for job in jobs]))  # (B, L, D)
            results: list[CaptionResult | None] = [None] * len(jobs)
            for (beam_size, max_length), rows in _groups(
                [(job.beam_size, job.max_length) for job in jobs]
            ).items():
                index = torch.tensor(rows, device=features.device)
                decoded = self.captioner.caption_features(
                    features.index_select(0, index), beam_size=beam_size, max_length=max_length
                )
                for row, result in zip(rows, decoded, strict=True):
                    results[row] = result
        return results  # type: ignore[return-value]

    async def caption(
        self, pixels: Sequence[torch.Tensor], beam_size: int, max_length: int
    ) -> list[tuple[CaptionResult, int]]:
        """Captions for preprocessed images, with the size of the batch each one ran in."""
        jobs = [CaptionJob(p, beam_size, max_length) for p in pixels]
        return await self.batcher.submit_many(jobs)


@dataclass(frozen=True)
class VQAJob:
    key: str  # feature cache key: image content + model
    pixels: torch.Tensor  # (3, S, S)
    question: str
    top_k: int


class VQAService:
    name = "vqa"

    def __init__(self, model: Any, settings: Settings, metrics: Metrics):
        from captioner.feature_cache import FeatureCache

        self.model = model
        self.metrics = metrics
        self.cache = (
            FeatureCache(settings.feature_cache_items) if settings.feature_cache_items else None
        )
        self.batcher: MicroBatcher[VQAJob, Any] = _batcher(
            self.name, self.run_batch, settings, metrics
        )

    @property
    def input_size(self) -> int:
        return self.model.input_size

    def model_ref(self) -> dict[str, str]:
        return {"name": self.model.name, "version": self.model.version}

    def metadata(self) -> dict[str, Any]:
        return self.model.metadata()

    def cache_key(self, digest: str) -> str:
        """Feature cache key of an upload, from the sha256 `digest` of its bytes."""
        from captioner.feature_cache import key_for

        return key_for(bytes.fromhex(digest), self.model.name, self.model.version)

    def run_batch(self, jobs: list[VQAJob]) -> list[Any]:
        with torch.inference_mode():
            features = self._features(jobs)  # (B, L, M): image memory, see VQAModel.encode
            results: list[Any] = [None] * len(jobs)
            for top_k, rows in _groups([job.top_k for job in jobs]).items():
                index = torch.tensor(rows, device=features.device)
                answers = self.model.answer_features(
                    features.index_select(0, index), [jobs[r].question for r in rows], top_k
                )
                for row, answer in zip(rows, answers, strict=True):
                    results[row] = answer
        return results

    def _features(self, jobs: list[VQAJob]) -> torch.Tensor:
        """Encoder features per job: cached ones reused, each distinct new image encoded once."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, torch.Tensor] = {}
        for job in jobs:
            if job.key in found or job.key in todo:
                continue
            cached = self.cache.get(job.key) if self.cache is not None else None
            if cached is not None:
                found[job.key] = cached
            else:
                todo[job.key] = job.pixels
        self.metrics.cache_hits.labels(self.name).inc(len(found))
        self.metrics.cache_misses.labels(self.name).inc(len(todo))
        if todo:
            encoded = self.model.encode(torch.stack(list(todo.values())))  # (N, L, M)
            for key, feats in zip(todo, encoded, strict=True):
                found[key] = feats.clone()  # a copy, so the cache does not pin the whole batch
                if self.cache is not None:
                    self.cache.put(key, found[key])
        return torch.stack([found[job.key] for job in jobs])

    async def answer(
        self, key: str, pixels: torch.Tensor, question: str, top_k: int
    ) -> tuple[Any, int]:
        return await self.batcher.submit(VQAJob(key, pixels, question, top_k))
