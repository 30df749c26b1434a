"""Helpers for the API tests: tiny model folders, test images, a TestClient, a gated model.

Fixture-free on purpose (tests/conftest.py belongs to the model code): each test module builds
what it needs with these functions, usually once per module.
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.exceptions import StarletteDeprecationWarning

from api.settings import Settings
from captioner.caption.captioner import Captioner
from captioner.data.shapes import make_scene, render
from captioner.vocab import Vocabulary
from captioner.vqa.answerer import Answerer, VQANet
from captioner.word_vectors import WordVectors, init_embedding
from tests.conftest import TINY_CAPTIONS, tiny_encoder_config, tiny_model

with warnings.catch_warnings():
    # Starlette 1.x prefers the `httpx2` package for its TestClient and warns when it falls back
    # to `httpx`; the client works the same either way.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a square?"]
ANSWERS = ["red", "blue", "green", "one", "two", "yes", "no"]
GRID = (4, 4)  # tiny_encoder_config: grid_size=4


def save_tiny_captioner(
    path: Path, attention: bool = True, name: str = "tiny-cap", version: str = "1"
) -> Path:
    vocab = Vocabulary.build(TINY_CAPTIONS)
    captioner = Captioner(
        tiny_model(len(vocab), attention=attention), vocab, name=name, version=version
    )
    training = {"data": {"dataset": "tiny"}, "metrics": {"bleu4": 0.5}}
    return captioner.save(path, training=training)


def save_tiny_vqa(
    path: Path, name: str = "tiny-vqa", version: str = "1", glimpses: int = 1
) -> Path:
    torch.manual_seed(0)
    vocab = Vocabulary.build(QUESTIONS)
    net = VQANet.build(
        tiny_encoder_config(),
        len(vocab),
        len(ANSWERS),
        embed_dim=8,
        hidden_dim=8,
        attention_dim=8,
        fusion_dim=16,
        glimpses=glimpses,
        dropout=0.0,
    )
    model = Answerer(net, vocab, ANSWERS, name=name, version=version)
    return model.save(path, training={"data": {"dataset": "tiny"}, "metrics": {"accuracy": 0.1}})


# Words of "vectors" for `tiny_vectors_vqa`: the questions' words and some no question uses.
VECTOR_WORDS = ["what", "color", "is", "the", "circle", "?", "zebra", "hue", "ball", "many"]


def tiny_vectors_vqa(name: str = "tiny-bilstm") -> Answerer:
    """A tiny VQA model with a bidirectional question LSTM, every option that reads the question,
    and its question embedding started from (random, 6-d) word vectors, whose words extend the
    vocabulary."""
    vectors = WordVectors(
        VECTOR_WORDS, np.random.default_rng(0).normal(size=(len(VECTOR_WORDS), 6)), "tiny"
    )
    vocab = Vocabulary.build(QUESTIONS).extended(vectors.text_words(len(VECTOR_WORDS)))
    torch.manual_seed(0)
    net = VQANet.build(
        tiny_encoder_config(),
        len(vocab),
        len(ANSWERS),
        embed_dim=vectors.dim,
        hidden_dim=8,
        attention_dim=8,
        fusion_dim=16,
        glimpses=2,
        bidirectional=True,
        question_attention=True,
        stacked=True,
        relative=True,
        coords=True,
        count=True,
        dropout=0.0,
    )
    init_embedding(net.question.embedding, vocab.itos, vectors)
    return Answerer(net, vocab, ANSWERS, name=name, version="1")


COCO_MINI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coco-mini"


def coco_photo(index: int = 0) -> bytes:
    """A real photo (JPEG bytes) of ../shared/data/coco-mini; skips the test when it is absent."""
    photos = sorted((COCO_MINI / "images").glob("*.jpg"))
    if len(photos) <= index:
        pytest.skip(f"coco-mini photos not found at {COCO_MINI / 'images'}")
    return photos[index].read_bytes()


def scene_png(seed: int = 0) -> bytes:
    """A shapes-world scene (what the demo models were trained on), as PNG bytes."""
    return encode(render(make_scene(seed)))


def settings(**overrides: Any) -> Settings:
    """Settings for a test: no models unless given, no batching delay, small caps, the captioner
    in this process (tests swap and gate it; tests/test_api_model_process.py covers the other)."""
    values: dict[str, Any] = {
        "caption_model": None,
        "model_process": False,
        "vqa_model": None,
        "max_batch_delay_ms": 0,
        "max_upload_bytes": 1_000_000,
        "max_pixels": 4_000_000,
        "max_batch_images": 8,
        "max_queue": 16,
        "request_timeout_s": 20,
        "api_key": None,
        "cors_origins": [],
    }
    values.update(overrides)
    return Settings(**values)


def noise_image(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **save_args: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def png(seed: int = 0, size: tuple[int, int] = (32, 32)) -> bytes:
    return encode(noise_image(seed, size))


def upload(data: bytes, name: str = "image.png", content_type: str = "image/png") -> dict:
    return {"image": (name, data, content_type)}


def assert_error(response, status: int) -> str:
    """The response has `status` and the DESIGN's error body, `{"detail": str}`; returns detail."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"}
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


class GatedCaptioner(Captioner):
    """A real captioner whose encoder pass waits until the test opens the gate.

    `entered` is set when a batch reaches the model, so a test can tell a request is running.
    """

    def __init__(self, base: Captioner):
        super().__init__(base.model, base.vocab, name=base.name, version=base.version)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls = 0

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("the test never opened the gate")
        return super().encode(batch)


def gate_captioner(client: TestClient) -> GatedCaptioner:
    """Swap the running app's captioner for a gated copy of itself."""
    service = client.app.state.services["captioner"]
    gated = GatedCaptioner(service.model)
    service.model = gated
    return gated
