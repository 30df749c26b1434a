"""Fuzzing `load_image`: whatever the bytes, only `ImageError` may escape."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.image import ImageError, load_image

# A small cap keeps each example cheap when a mutation inflates the declared size.
MAX_PIXELS = 100_000
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def seed_image(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 16, 4), dtype=np.uint8)
    pixels[..., 3] = np.where(pixels[..., 3] > 64, 255, 0)
    image = Image.fromarray(pixels, mode="RGBA")
    if fmt in ("JPEG", "BMP"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    if fmt == "GIF":  # two frames, so frame handling is fuzzed too
        image.save(buf, fmt, save_all=True, append_images=[image.rotate(90)], duration=50)
    else:
        image.save(buf, fmt)
    return buf.getvalue()


FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]
SEEDS = {fmt: seed_image(fmt) for fmt in FORMATS}


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """Up to 4 edits of `data`: bit flips, byte overwrites, inserted chunks, cuts, truncation."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite" and out:
            value = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
            out[at] = value
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 64))]
        else:
            del out[at:]
    return bytes(out)


def check(data: bytes) -> None:
    try:
        image = load_image(data, max_pixels=MAX_PIXELS)
    except ImageError:
        return
    assert image.mode == "RGB"
    assert 1 <= image.width * image.height <= MAX_PIXELS


@pytest.mark.parametrize("fmt", FORMATS)
def test_seed_images_decode(fmt):
    assert load_image(SEEDS[fmt]).size == (16, 12)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    check(data)


@FUZZ
@given(st.binary(max_size=512).map(lambda tail: SEEDS["PNG"][:16] + tail))
def test_random_bytes_after_a_valid_signature(data):
    check(data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_images(fmt):
    @FUZZ
    @given(mutated(SEEDS[fmt]))
    def run(data):
        check(data)

    run()
