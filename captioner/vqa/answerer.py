"""`Answerer`: a loaded VQA model folder (a `VQANet`, its question vocabulary and answers) with a
plain `answer(images, questions)` API.

Used alike by the CLI, the service and the scripts:

    vqa = Answerer.load("models/shapes-vqa")
    [result] = vqa.answer(["scene.png"], ["what color is the circle?"], top_k=3)
    result.answer, result.confidence, result.top_answers, result.attention  # (G, h, w) or None

The answerer owns the one feature cache: encoded images and paths are looked up by
`image_key(their bytes)`, so several questions about one image cost one encoder pass, whether
they come through `answer` or through the service (`image_memory`). With domain statistics in
the folder (`captioner.domain`), each image's domain score is computed from the encoder's grid
when the image is encoded and cached with its memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captioner.card import CARD, ModelCard, card_from_training, read_card
from captioner.checkpoint import ModelDirError, build_checked, load_model_dir
from captioner.domain import DomainStats, attach, load_domain
from captioner.encoder import EncoderConfig
from captioner.image import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    UnreadableImageError,
    as_images,
    preprocess,
)
from captioner.model_folder import ModelFolder
from captioner.quantize import check_quantize, quantize_model
from captioner.results import AnswerResult
from captioner.vocab import Vocabulary
from captioner.vqa.feature_cache import FeatureCache, key_for
from captioner.vqa.vqa_net import VQAConfig, VQANet

ANSWERS, QUESTION_VOCAB = "answers.json", "question_vocab.json"
# Layers `quantize="int8"` keeps in float: the glimpse scores (the glimpse loop slices their
# weight), and the classifier's first layer, whose input puts the glimpse-count features (sums of
# sigmoids, up to L) beside unit-norm glimpses: one int8 scale for both erased the small ones
# (shapes-vqa count accuracy 0.98 -> 0.47 with it quantized).
INT8_KEEP_FLOAT = frozenset({"attend.score", "classifier.1"})


def encode_questions(
    questions: Sequence[str], vocab: Vocabulary, max_tokens: int = 0
) -> torch.Tensor:
    """Word ids (Q, T) padded on the right with `<pad>`; unknown words become `<unk>`.

    `max_tokens` > 0 keeps only the first that many words. A question without words is refused.
    """
    rows = []
    for q in questions:
        if not isinstance(q, str):
            raise ValueError(f"questions must be strings, got {type(q).__name__}")
        ids = vocab.encode(q, add_special=False)
        if not ids:
            raise ValueError(f"question {q!r} has no words")
        rows.append(ids[:max_tokens] if max_tokens > 0 else ids)
    out = torch.full((len(rows), max(map(len, rows), default=1)), vocab.pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class Answerer(ModelFolder):
    what = "a VQA model"

    def __init__(
        self,
        model: VQANet,
        question_vocab: Vocabulary,
        answers: Sequence[str],
        name: str = "vqa",
        version: str = "0",
        training: dict | None = None,
        device: str | torch.device = "cpu",
        cache_size: int = 256,
        card: ModelCard | None = None,
        domain: DomainStats | None = None,
    ):
        if model.config.question_vocab_size != len(question_vocab):
            raise ValueError(
                f"model question_vocab_size {model.config.question_vocab_size} != question "
                f"vocabulary size {len(question_vocab)}"
            )
        if model.config.num_answers != len(answers):
            raise ValueError(
                f"model num_answers {model.config.num_answers} != {len(answers)} answers"
            )
        self.model = model.to(device).eval()
        self.question_vocab = question_vocab
        self.answers = list(answers)
        self.name, self.version = name, version
        self.training = training or {}
        self.device = torch.device(device)
        self.cache = FeatureCache(cache_size)
        sizes = len(question_vocab), len(self.answers)
        self.card = card or card_from_training("vqa", self.training, *sizes)
        self.card.check_matches("vqa", *sizes)
        self.domain = domain  # what the training images look like to the encoder, or None

    @property
    def domain(self) -> DomainStats | None:
        return self._domain

    @domain.setter
    def domain(self, stats: DomainStats | None) -> None:
        self._domain = attach(stats, self.model.encoder.feature_dim, self.device)
        self.cache.clear()  # cached entries hold scores by the previous statistics
        self.quantize: str | None = None  # "int8" when `load` quantized the model

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        cache_size: int = 256,
        quantize: str | None = None,
    ) -> Answerer:
        """The VQA model in folder `path`; `quantize="int8"` (CPU only) stores its question LSTM
        and linear layers as int8 (`captioner.quantize`); such an answerer cannot be saved."""
        check_quantize(quantize, device)
        config, weights, side = load_model_dir(path, "vqa", required=(ANSWERS, QUESTION_VOCAB))
        try:
            encoder_config = EncoderConfig.from_dict(config["encoder"])
            vqa_config = VQAConfig(**config["vqa"])
            vocab = Vocabulary.from_json(side[QUESTION_VOCAB])
            answers = side[ANSWERS]["answers"]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ValueError("answers must be a list of strings")
            # Built only from model.safetensors: the encoder's `weights` path is ignored here.
            model = build_checked(
                lambda: VQANet(encoder_config, vqa_config, load_weights=False), weights, path
            )
            answerer = cls(
                quantize_model(model.eval(), quantize, skip=INT8_KEEP_FLOAT),
                vocab,
                answers,
                name=str(config.get("name", Path(path).name)),
                version=str(config.get("version", "0")),
                training=side.get("training.json"),
                device=device,
                cache_size=cache_size,
                card=_card(path, side, len(vocab), len(answers)),
                domain=load_domain(path, side, model.encoder.feature_dim),
            )
            answerer.quantize = quantize
            return answerer
        except ModelDirError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(
                f"{path}: config.json, {ANSWERS} or {QUESTION_VOCAB} do not describe a VQA "
                f"model: {exc}"
            ) from exc

    def config(self) -> dict[str, Any]:
        return {
            "kind": "vqa",
            "name": self.name,
            "version": self.version,
            "encoder": self.model.encoder.config.to_dict(),
            "vqa": self.model.config.to_dict(),
        }

    def files(self, training: dict | None = None) -> dict[str, Any]:
        """The side JSON files of a model folder."""
        card = self.card if training is None else self.card.with_training(training)
        return {
            ANSWERS: {"answers": self.answers},
            QUESTION_VOCAB: self.question_vocab.to_json(),
            "training.json": training if training is not None else self.training,
            CARD: card.to_dict(),
            **(self.domain.files() if self.domain is not None else {}),
        }

    def metadata(self) -> dict[str, Any]:
        enc, c = self.model.encoder.config, self.model.config
        h, w = self.grid_hw
        return {
            "name": self.name,
            "version": self.version,
            "kind": "vqa",
            "encoder": enc.name,
            "input_size": enc.input_size,
            "question_encoder": c.question_encoder,
            "attention": c.attention,
            "attention_grid": [h, w] if c.attention else None,
            "glimpses": c.glimpses if c.attention else 0,
            "num_answers": len(self.answers),
            "vocabulary_size": len(self.question_vocab),
            **self.folder_metadata(),
        }

    # -- inference -----------------------------------------------------------------------------
    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.model.grid_hw

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> image memory (B, L, M) on this model's device: the
        encoder's grid as the head reads it, attention projection included (`VQANet.prepare`),
        so a cached image costs only the question."""
        return self.model.prepare(self.model.encoder(batch.to(self.device))[0])

    @torch.inference_mode()
    def encode_scored(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[float] | None]:
        """As `encode`, with each image's domain score from the same encoder pass (higher: more
        unlike the training images), or None without domain statistics."""
        grid = self.model.encoder(batch.to(self.device))[0]  # (B, L, D)
        scores = None if self.domain is None else self.domain.scores(grid)
        return self.model.prepare(grid), scores

    @torch.inference_mode()
    def answer_features(
        self,
        features: torch.Tensor,
        questions: Sequence[str],
        top_k: int = 3,
        image_index: Sequence[int] | None = None,
        domain_scores: Sequence[float | None] | None = None,
    ) -> list[AnswerResult]:
        """Answers about image memory `features` (B, L, M) from `encode`, in question order:
        question q is about row `image_index[q]` (default: one question per row). `domain_scores`
        (one per row, from `encode_scored`) go into the answers with their verdicts."""
        if image_index is None and len(questions) != len(features):
            raise ValueError(f"got {len(questions)} questions for {len(features)} images")
        if image_index is not None and len(image_index) != len(questions):
            raise ValueError(f"got {len(image_index)} image indices for {len(questions)} questions")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if domain_scores is not None and self.domain is None:
            raise ValueError("domain_scores given, but this model has no domain statistics")
        if domain_scores is not None and len(domain_scores) != len(features):
            raise ValueError(f"got {len(domain_scores)} domain scores for {len(features)} images")
        if len(questions) == 0:
            return []
        ids = encode_questions(questions, self.question_vocab).to(self.device)
        index = None if image_index is None else torch.as_tensor(image_index, device=self.device)
        logits, alpha = self.model.head_prepared(features.to(self.device), ids, index)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        top_p, top_i = probs.topk(min(top_k, len(self.answers)), dim=1)
        h, w = self.grid_hw
        maps = None if alpha is None else alpha.float().cpu().numpy().reshape(len(ids), -1, h, w)
        results, model = [], {"name": self.name, "version": self.version}
        for k in range(len(ids)):
            top = [(self.answers[int(i)], float(p)) for p, i in zip(top_p[k], top_i[k])]
            row = k if image_index is None else int(image_index[k])
            score = None if domain_scores is None else domain_scores[row]
            results.append(
                AnswerResult(
                    question=questions[k],
                    answer=top[0][0],
                    confidence=top[0][1],
                    top_answers=top,
                    attention=None if maps is None else maps[k],
                    model=model,
                    unknown_words=self.question_vocab.unknown_words(questions[k]),
                    known_content_words=self.question_vocab.known_content_words(questions[k]),
                    domain_score=score,
                    in_domain=None if score is None else score <= self.domain.threshold,
                )
            )
        return results

    def answer(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        top_k: int = 3,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> list[AnswerResult]:
        """Answer `questions[i]` about `images[i]` (PIL images, encoded bytes or paths).

        Bytes and paths are looked up in the feature cache by content, so asking again about the
        same image (in this call or a later one) skips the encoder.
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions")
        if len(images) == 0:
            return []
        memory, scores = self.features_for(images, max_pixels)
        return self.answer_features(memory, questions, top_k, domain_scores=scores)

    def image_key(self, data: bytes) -> str:
        """The feature cache key of an encoded image: its bytes and this model's name and version."""
        return key_for(data, self.name, self.version)

    @torch.inference_mode()
    def image_memory(
        self, keys: Sequence[str | None], pixels: Callable[[int], torch.Tensor]
    ) -> tuple[torch.Tensor, list[float | None] | None]:
        """(image memory (B, L, M) (see `encode`), domain scores (B) or None without domain
        statistics) for B images given by their cache keys, taking each cached one from the cache
        and encoding the others, each distinct key once. `pixels(i)` gives image i preprocessed,
        (3, S, S); a None key is never cached."""
        found: dict[str | int, tuple[torch.Tensor, float | None]] = {}
        todo: dict[str | int, torch.Tensor] = {}  # key, or position for an uncached image
        for i, key in enumerate(keys):
            slot = i if key is None else key
            if slot in found or slot in todo:
                continue
            cached = self.cache.get(key) if key is not None else None
            if cached is not None:
                found[slot] = cached
            else:
                todo[slot] = pixels(i)
        if todo:
            encoded, scores = self.encode_scored(torch.stack(list(todo.values())))
            scores = scores or [None] * len(todo)
            for slot, memory, score in zip(todo, encoded, scores, strict=True):
                # A copy, so the cache does not pin the whole batch; the score travels with it.
                found[slot] = (memory.clone(), score)
                if not isinstance(slot, int):
                    self.cache.put(slot, found[slot])
        rows = [found[i if key is None else key] for i, key in enumerate(keys)]
        memory = torch.stack([m for m, _ in rows])
        return memory, None if self.domain is None else [s for _, s in rows]

    def features_for(
        self, images: Sequence[ImageInput], max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[torch.Tensor, list[float | None] | None]:
        """(image memory (B, L, M), domain scores) as `image_memory` gives them, for PIL images,
        encoded bytes or paths: bytes and paths through the cache (decoded only when not cached),
        PIL images encoded each time."""
        keys: list[str | None] = []
        sources: list[Image.Image | bytes] = []
        for image in images:
            if isinstance(image, Image.Image):
                keys.append(None)
                sources.append(image)
            else:
                data = _read_bytes(image)
                keys.append(self.image_key(data))
                sources.append(data)

        def pixels(i: int) -> torch.Tensor:
            [image] = as_images([sources[i]], max_pixels)
            return preprocess(image, self.input_size)

        return self.image_memory(keys, pixels)


def _card(path: str | Path, side: dict[str, Any], vocabulary_size: int, answers: int) -> ModelCard:
    try:
        return read_card(side, "vqa", side.get("training.json"), vocabulary_size, answers)
    except ValueError as exc:
        raise ModelDirError(f"{Path(path) / CARD} is not a valid model card: {exc}") from exc


def _read_bytes(image: bytes | bytearray | memoryview | str | os.PathLike) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise UnreadableImageError(
                f"cannot open image file {str(image)!r}: {exc.strerror}"
            ) from exc
    raise ValueError(
        f"an image must be a PIL image, encoded bytes or a path, got {type(image).__name__}"
    )
