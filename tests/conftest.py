"""Tiny real models built on the fly (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from captioner.encoder import EncoderConfig
from captioner.model import CaptionModel
from captioner.vocab import Vocabulary

TINY_CAPTIONS = [
    "a small red circle to the left of a large blue square",
    "two green triangles",
    "a big yellow star above a small purple circle",
]


def tiny_encoder_config(**overrides) -> EncoderConfig:
    args = dict(name="small_cnn", input_size=32, grid_size=4, width=4, fine_tune_blocks=3)
    args.update(overrides)
    return EncoderConfig(**args)


def tiny_model(vocab_size: int = 30, seed: int = 0, **decoder_args) -> CaptionModel:
    torch.manual_seed(seed)
    args = dict(embed_dim=16, hidden_dim=24, attention_dim=12, dropout=0.0)
    args.update(decoder_args)
    encoder_args = args.pop("encoder", {})
    return CaptionModel.build(tiny_encoder_config(**encoder_args), vocab_size=vocab_size, **args)


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.build(TINY_CAPTIONS)


@pytest.fixture
def captioner(vocab):
    from captioner.pipeline import Captioner

    return Captioner(tiny_model(len(vocab)), vocab, name="tiny", version="1")
