"""`Captioner`: a loaded captioning model folder with a plain `caption(images)` API.

Used alike by the CLI, the service and the scripts:

    captioner = Captioner.load("models/shapes-captioner")
    [result] = captioner.caption(["photo.jpg"], beam_size=3)
    result.caption, result.tokens, result.token_logprobs, result.attention  # (T, h, w) or None
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import ModelDirError, build_checked, load_model_dir, save_model_dir
from .decoder import DecoderConfig
from .encoder import EncoderConfig
from .image import DEFAULT_MAX_PIXELS, load_image, preprocess_batch, to_rgb
from .model import CaptionModel
from .search import Hypothesis, beam_search, greedy, sample
from .vocab import Vocabulary

ImageInput = Image.Image | bytes | str | os.PathLike


@dataclass
class CaptionResult:
    caption: str
    tokens: list[str]
    token_logprobs: list[float]
    score: float
    attention: np.ndarray | None  # (len(tokens), h, w), each map sums to 1; None without attention

    def to_dict(self, attention: bool = True) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "score": self.score,
            "attention": (
                self.attention.tolist() if attention and self.attention is not None else None
            ),
        }


def as_images(
    images: Sequence[ImageInput], max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Image.Image]:
    return [
        to_rgb(im) if isinstance(im, Image.Image) else load_image(im, max_pixels) for im in images
    ]


class Captioner:
    def __init__(
        self,
        model: CaptionModel,
        vocab: Vocabulary,
        name: str = "captioner",
        version: str = "0",
        training: dict | None = None,
        device: str | torch.device = "cpu",
    ):
        if model.decoder.config.vocab_size != len(vocab):
            raise ValueError(
                f"model vocab_size {model.decoder.config.vocab_size} != vocabulary size {len(vocab)}"
            )
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.name, self.version = name, version
        self.training = training or {}
        self.device = torch.device(device)

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Captioner:
        config, weights, side = load_model_dir(path, "captioner", required=("vocab.json",))
        try:
            encoder_config = EncoderConfig(**config["encoder"])
            decoder_config = DecoderConfig(**config["decoder"])
            vocab = Vocabulary.from_json(side["vocab.json"])
            # Built only from model.safetensors: the encoder's `weights` path is ignored here.
            model = build_checked(
                lambda: CaptionModel(encoder_config, decoder_config, load_weights=False),
                weights,
                path,
            )
            return cls(
                model,
                vocab,
                name=str(config.get("name", Path(path).name)),
                version=str(config.get("version", "0")),
                training=side.get("training.json"),
                device=device,
            )
        except ModelDirError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(
                f"{path}: config.json or vocab.json does not describe a captioner: {exc}"
            ) from exc

    def config(self) -> dict[str, Any]:
        return {
            "kind": "captioner",
            "name": self.name,
            "version": self.version,
            "encoder": self.model.encoder.config.to_dict(),
            "decoder": self.model.decoder.config.to_dict(),
        }

    def save(self, path: str | Path, training: dict | None = None) -> Path:
        files = {"vocab.json": self.vocab.to_json(), "training.json": training or self.training}
        return save_model_dir(path, self.config(), self.model.state_dict(), files)

    def metadata(self) -> dict[str, Any]:
        enc, dec = self.model.encoder.config, self.model.decoder.config
        h, w = self.model.grid_hw
        return {
            "name": self.name,
            "version": self.version,
            "kind": "captioner",
            "encoder": enc.name,
            "input_size": enc.input_size,
            "decoder": dec.cell,
            "attention": dec.attention,
            "attention_grid": [h, w] if dec.attention else None,
            "vocabulary_size": len(self.vocab),
            "training_data": self.training.get("data"),
            "metrics": self.training.get("metrics"),
        }

    # -- inference -----------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.model.encoder.config.input_size

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return preprocess_batch(as_images(images), self.input_size)

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> grid features (B, L, D) on this captioner's device."""
        return self.model.encoder(batch.to(self.device))[0]

    def caption(
        self,
        images: Sequence[ImageInput],
        beam_size: int = 3,
        max_length: int = 20,
        length_penalty: float = 0.0,
        method: str = "beam",
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[CaptionResult]:
        """Caption images (PIL images, encoded bytes or paths); results in input order."""
        if len(images) == 0:
            return []
        return self.caption_features(
            self.encode(self.preprocess(images)),
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
            method=method,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )

    def caption_features(
        self,
        features: torch.Tensor,
        beam_size: int = 3,
        max_length: int = 20,
        length_penalty: float = 0.0,
        method: str = "beam",
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[CaptionResult]:
        decoder = self.model.decoder
        if method == "beam":
            hyps = [
                h[0] for h in beam_search(decoder, features, beam_size, max_length, length_penalty)
            ]
        elif method == "greedy":
            hyps = greedy(decoder, features, max_length)
        elif method == "sample":
            gen = (
                torch.Generator(device=features.device).manual_seed(seed)
                if seed is not None
                else None
            )
            hyps = sample(decoder, features, max_length, temperature, top_k, generator=gen)
        else:
            raise ValueError(f"unknown decoding method {method!r}; choose beam, greedy or sample")
        return [self._result(h) for h in hyps]

    def _result(self, hyp: Hypothesis) -> CaptionResult:
        words = [self.vocab.itos[i] for i in hyp.tokens]
        attention = None
        if hyp.attention is not None:
            h, w = self.model.grid_hw
            attention = hyp.attention.numpy().reshape(len(words), h, w)
        return CaptionResult(
            caption=self.vocab.decode(hyp.tokens),
            tokens=words,
            token_logprobs=[float(x) for x in hyp.token_logprobs],
            score=float(hyp.score),
            attention=attention,
        )
