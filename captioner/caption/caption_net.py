"""The captioning model: an `Encoder` and a `CaptionDecoder` behind one `forward`."""

from __future__ import annotations

import torch
from torch import nn

from captioner.caption.attention import supervised_attention_loss
from captioner.caption.decoder import CaptionDecoder, DecoderConfig
from captioner.encoder import Encoder, EncoderConfig


class CaptionNet(nn.Module):
    def __init__(
        self,
        encoder_config: EncoderConfig,
        decoder_config: DecoderConfig,
        load_weights: bool = True,
    ):
        super().__init__()
        self.encoder = Encoder(encoder_config, load_weights=load_weights)
        if decoder_config.feature_dim != self.encoder.feature_dim:
            raise ValueError(
                f"decoder feature_dim {decoder_config.feature_dim} does not match encoder "
                f"{encoder_config.name} output {self.encoder.feature_dim}"
            )
        if decoder_config.grid_cells != self.encoder.num_cells:
            raise ValueError(
                f"decoder grid_cells {decoder_config.grid_cells} does not match the encoder grid "
                f"{self.encoder.grid_hw}"
            )
        self.decoder = CaptionDecoder(decoder_config)

    @classmethod
    def build(cls, encoder_config: EncoderConfig, vocab_size: int, **decoder_args) -> CaptionNet:
        """A model whose decoder sizes follow from the encoder (feature width, grid cells)."""
        probe = Encoder(encoder_config, load_weights=False)
        decoder_config = DecoderConfig(
            vocab_size=vocab_size,
            feature_dim=probe.feature_dim,
            grid_cells=probe.num_cells,
            **decoder_args,
        )
        return cls(encoder_config, decoder_config)

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.encoder.grid_hw

    def features(self, images_or_features: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) go through the encoder; precomputed grids (B, L, D) pass as they are."""
        return self.encoder.grid_of(images_or_features)

    def forward(
        self,
        images_or_features: torch.Tensor,
        captions: torch.Tensor,
        sample_prob: float = 0.0,
        image_index: torch.Tensor | None = None,
        attention_targets: torch.Tensor | None = None,
        attention_weight: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced `(logits (B, T-1, V), loss)`; decoding lives in `captioner.caption.search`.

        Caption b is about image `image_index[b]` (default: one caption per image), so an image
        with several captions in the batch is encoded once. `sample_prob` > 0 turns on scheduled
        sampling (see `CaptionDecoder.forward`). With `attention_targets` (B, T-1, L) bool, the
        cells each predicted word should attend (`supervised_attention_loss`), the loss adds
        `attention_weight` times that term."""
        features = self.features(images_or_features)
        logits, loss, alphas = self.decoder(features, captions, sample_prob, image_index)
        if attention_targets is not None and attention_weight > 0:
            if alphas is None:
                raise ValueError("attention targets need a decoder with attention")
            loss = loss + attention_weight * supervised_attention_loss(alphas, attention_targets)
        return logits, loss
