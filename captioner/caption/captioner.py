"""`Captioner`: a loaded captioning model folder (a `CaptionNet` and its vocabulary) with a plain
`caption(images)` API.

Used alike by the CLI, the service and the scripts:

    captioner = Captioner.load("models/shapes-captioner")
    [result] = captioner.caption(["photo.jpg"], beam_size=3)
    result.caption, result.tokens, result.token_logprobs, result.attention  # (T, h, w) or None
    result.domain_score, result.in_domain  # None when the folder has no domain statistics
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from captioner.caption.caption_net import CaptionNet
from captioner.caption.decoder import DecoderConfig
from captioner.caption.search import Hypothesis, Watch, Word, beam_search, greedy, sample
from captioner.card import CARD, ModelCard, card_from_training, read_card
from captioner.checkpoint import ModelDirError, build_checked, load_model_dir
from captioner.domain import DomainStats, attach, load_domain
from captioner.encoder import EncoderConfig
from captioner.image import ImageInput
from captioner.model_folder import ModelFolder
from captioner.quantize import check_quantize, quantize_model
from captioner.results import CaptionResult, CaptionWord
from captioner.vocab import Vocabulary


class Captioner(ModelFolder):
    what = "a captioner"

    def __init__(
        self,
        model: CaptionNet,
        vocab: Vocabulary,
        name: str = "captioner",
        version: str = "0",
        training: dict | None = None,
        device: str | torch.device = "cpu",
        card: ModelCard | None = None,
        domain: DomainStats | None = None,
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
        self.card = card or card_from_training("captioner", self.training, len(vocab))
        self.card.check_matches("captioner", len(vocab), None)
        self.domain = domain  # what the training images look like to the encoder, or None

    @property
    def domain(self) -> DomainStats | None:
        return self._domain

    @domain.setter
    def domain(self, stats: DomainStats | None) -> None:
        self._domain = attach(stats, self.model.encoder.feature_dim, self.device)
        self.quantize: str | None = None  # "int8" when `load` quantized the model

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        quantize: str | None = None,
        fuse_attention: bool = False,
    ) -> Captioner:
        """The captioner in model folder `path`; `quantize="int8"` (CPU only) stores the decoder's
        LSTM and linear layers as int8 (`captioner.quantize`); such a captioner cannot be saved.
        `fuse_attention`: see `fuse_attention()` (not with int8)."""
        check_quantize(quantize, device)
        if fuse_attention and quantize is not None:
            raise ValueError(
                f"fuse_attention works on float weights, not with quantize={quantize!r}: choose one"
            )
        config, weights, side = load_model_dir(path, "captioner", required=("vocab.json",))
        try:
            encoder_config = EncoderConfig.from_dict(config["encoder"])
            decoder_config = DecoderConfig(**config["decoder"])
            vocab = Vocabulary.from_json(side["vocab.json"])
            # Built only from model.safetensors: the encoder's `weights` path is ignored here.
            model = build_checked(
                lambda: CaptionNet(encoder_config, decoder_config, load_weights=False),
                weights,
                path,
            )
            captioner = cls(
                quantize_model(model.eval(), quantize),
                vocab,
                name=str(config.get("name", Path(path).name)),
                version=str(config.get("version", "0")),
                training=side.get("training.json"),
                device=device,
                card=_card(path, side, len(vocab)),
                domain=load_domain(path, side, model.encoder.feature_dim),
            )
            captioner.quantize = quantize
        except ModelDirError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(
                f"{path}: config.json or vocab.json does not describe a captioner: {exc}"
            ) from exc
        if fuse_attention:
            captioner.fuse_attention()
        return captioner

    def fuse_attention(self) -> bool:
        """Compute the soft attention's energy at inference as one compiled loop
        (`SoftAttention.fuse`: add, tanh and score fused; captions as eager, log-probs within
        float rounding), compiled here by a small search rather than on the first caption (a few
        seconds; needs the C++ compiler torch.compile's CPU backend uses). Pays where the eager
        tanh pass is slow (README, CPU deployment). False, and nothing changed, for a captioner
        without attention."""
        attend = self.model.decoder.attend
        if attend is None:
            return False
        attend.fuse()
        cells = self.model.grid_hw[0] * self.model.grid_hw[1]
        features = torch.zeros(2, cells, self.model.encoder.feature_dim, device=self.device)
        self.caption_features(features, beam_size=2, max_length=2)
        return True

    def config(self) -> dict[str, Any]:
        return {
            "kind": "captioner",
            "name": self.name,
            "version": self.version,
            "encoder": self.model.encoder.config.to_dict(),
            "decoder": self.model.decoder.config.to_dict(),
        }

    def files(self, training: dict | None = None) -> dict[str, Any]:
        """The side JSON files of a model folder."""
        card = self.card if training is None else self.card.with_training(training)
        return {
            "vocab.json": self.vocab.to_json(),
            "training.json": training if training is not None else self.training,
            CARD: card.to_dict(),
            **(self.domain.files() if self.domain is not None else {}),
        }

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
            **self.folder_metadata(),
        }

    # -- inference -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> grid features (B, L, D) on this captioner's device."""
        return self.model.encoder(batch.to(self.device))[0]

    @torch.inference_mode()
    def domain_scores(self, features: torch.Tensor) -> list[float] | None:
        """Grid features (B, L, D) from `encode` -> each image's domain score (higher: more unlike
        the training images), or None without domain statistics."""
        if self.domain is None:
            return None
        return self.domain.scores(features)

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
        watch: Watch | None = None,
    ) -> list[CaptionResult]:
        """Caption images (PIL images, encoded bytes or paths); results in input order.

        `watch` (`captioner.caption.search.Watch`) hears each image's words while the search
        runs, as soon as they are fixed (turn them into `CaptionWord`s with `caption_word`), and
        can drop images nobody waits for."""
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
            watch=watch,
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
        watch: Watch | None = None,
    ) -> list[CaptionResult]:
        decoder = self.model.decoder
        if method == "beam":
            hyps = [
                h[0]
                for h in beam_search(
                    decoder, features, beam_size, max_length, length_penalty, watch=watch
                )
            ]
        elif method == "greedy":
            hyps = greedy(decoder, features, max_length, watch=watch)
        elif method == "sample":
            gen = (
                torch.Generator(device=features.device).manual_seed(seed)
                if seed is not None
                else None
            )
            hyps = sample(
                decoder, features, max_length, temperature, top_k, generator=gen, watch=watch
            )
        else:
            raise ValueError(f"unknown decoding method {method!r}; choose beam, greedy or sample")
        scores = self.domain_scores(features) or [None] * len(hyps)
        return [self._result(h, s) for h, s in zip(hyps, scores, strict=True)]

    def caption_word(self, word: Word) -> CaptionWord:
        """A word a search told a watch, as the caption result holds it."""
        attention = None
        if word.attention is not None:
            attention = word.attention.numpy().reshape(self.model.grid_hw)
        return CaptionWord(word.position, self.vocab.itos[word.token], word.logprob, attention)

    def _result(self, hyp: Hypothesis, domain_score: float | None = None) -> CaptionResult:
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
            model={"name": self.name, "version": self.version},
            finished=hyp.finished,
            domain_score=domain_score,
            in_domain=None if domain_score is None else domain_score <= self.domain.threshold,
        )


def _card(path: str | Path, side: dict[str, Any], vocabulary_size: int) -> ModelCard:
    try:
        return read_card(side, "captioner", side.get("training.json"), vocabulary_size)
    except ValueError as exc:
        raise ModelDirError(f"{Path(path) / CARD} is not a valid model card: {exc}") from exc
