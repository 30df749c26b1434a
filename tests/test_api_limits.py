"""Odd but valid images are captioned; bad input is a 4xx with a string detail, never a 500."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from api.app import create_app
from tests.api_fixtures import (
    TestClient,
    assert_error,
    encode,
    gate_captioner,
    noise_image,
    png,
    save_tiny_captioner,
    settings,
    upload,
)

MAX_BYTES = 200_000  # per image in these tests


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = save_tiny_captioner(tmp_path_factory.mktemp("models") / "cap")
    app = create_app(
        settings(caption_model=folder, max_upload_bytes=MAX_BYTES, max_pixels=1_000_000)
    )
    with TestClient(app) as client:
        yield client


def caption(client, data: bytes, name: str = "x", query: str = "?max_length=3"):
    return client.post(f"/caption{query}", files=upload(data, name, "application/octet-stream"))


# -- odd but valid ---------------------------------------------------------------------------


def _cmyk_jpeg() -> bytes:
    return encode(noise_image(1, mode="CMYK"), "JPEG")


def _png16() -> bytes:
    values = np.random.default_rng(2).integers(0, 65536, (20, 30), dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def _palette_with_transparency() -> bytes:
    image = noise_image(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [noise_image(s).convert("P") for s in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(noise_image(4, size=(40, 20)), "JPEG", exif=exif)


def _rgba_png() -> bytes:
    return encode(noise_image(5, mode="RGBA"), "PNG")


ODD_IMAGES = {
    "cmyk.jpg": _cmyk_jpeg,
    "16bit.png": _png16,
    "palette-transparency.png": _palette_with_transparency,
    "animated.gif": _animated_gif,
    "exif-rotated.jpg": _exif_rotated_jpeg,
    "1x1.png": lambda: encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "rgba.png": _rgba_png,
    "grey.bmp": lambda: encode(noise_image(6, mode="L"), "BMP"),
    "tall.webp": lambda: encode(noise_image(7, size=(8, 300)), "WEBP"),
    "image.tiff": lambda: encode(noise_image(8), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_odd_but_valid_images(client, name):
    response = caption(client, ODD_IMAGES[name](), name, "?max_length=3&attention=png")
    assert response.status_code == 200, response.text
    assert set(response.json()) == {
        *("caption", "tokens", "token_logprobs", "score", "attention", "model", "finished"),
        *("domain_score", "in_domain"),
    }


def test_exif_rotation_is_applied_to_overlays(client):
    response = caption(client, _exif_rotated_jpeg(), "r.jpg", "?max_length=1&attention=png")
    overlay = response.json()["attention"]["overlays"][0]
    with Image.open(io.BytesIO(base64.b64decode(overlay))) as im:
        assert im.size == (20, 40)  # the stored 40x20 image, displayed upright


# -- bad images --------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims 10 gigapixels (1-bit greyscale, a little zero data)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * 10_000, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


BAD_IMAGES = {
    "empty": (b"", 415),
    "text": (b"hello, this is not an image\n" * 20, 415),
    "truncated jpeg": (encode(noise_image(9, size=(64, 64)), "JPEG")[:600], 415),
    "png header only": (png(1)[:40], 415),
    "html": (b"<html><body>hi</body></html>", 415),
    "pdf": (b"%PDF-1.4\n1 0 obj <<>> endobj\n", 415),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415),
    "png bomb": (_png_bomb(), 413),
    "over the pixel cap": (encode(Image.new("L", (1001, 1000)), "PNG"), 413),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images(client, name):
    data, status = BAD_IMAGES[name]
    assert_error(caption(client, data), status)


def test_pixel_cap_detail_names_the_size(client):
    detail = assert_error(caption(client, _png_bomb(5000, 400)), 413)
    assert "5000x400" in detail


def test_upload_over_the_byte_cap_is_413(client):
    data = b"\x89PNG" + bytes(MAX_BYTES)  # a bit over: passes the body limit, not the file cap
    assert str(MAX_BYTES) in assert_error(caption(client, data), 413)


def test_body_far_over_the_cap_is_refused_from_its_content_length(client):
    data = bytes(5 * MAX_BYTES)
    assert "request body" in assert_error(caption(client, data), 413)


def test_streamed_body_without_length_is_refused(client):
    boundary = "testboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(100):
            yield bytes(64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/caption",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in response.request.headers  # counted as it arrived
    assert "request body" in assert_error(response, 413)


# -- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "?beam_size=0",
        "?beam_size=11",
        "?beam_size=1.5",
        "?beam_size=abc",
        "?max_length=0",
        "?max_length=51",
        "?attention=heatmap",
        "?attention=",
    ],
)
def test_out_of_range_parameters_are_422(client, query):
    detail = assert_error(caption(client, png(1), query=query), 422)
    assert query[1:].split("=")[0] in detail


@pytest.mark.parametrize("query", ["?beam_size=1&max_length=1", "?beam_size=10&max_length=50"])
def test_parameter_bounds_are_accepted(client, query):
    assert caption(client, png(1), query=query).status_code == 200


def test_missing_image_field_is_422(client):
    assert "image" in assert_error(client.post("/caption", files={"photo": ("a.png", png(1))}), 422)


def test_image_sent_as_text_field_is_422(client):
    assert_error(client.post("/caption", data={"image": "not a file"}), 422)


def test_json_body_is_422(client):
    assert_error(client.post("/caption", json={"image": "aGVsbG8="}), 422)


def test_no_body_is_422(client):
    assert_error(client.post("/caption"), 422)


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/caption"), 405)


def test_service_still_works_after_bad_input(client):
    for data, _ in BAD_IMAGES.values():
        caption(client, data)
    assert caption(client, png(2)).status_code == 200


# -- a full queue ------------------------------------------------------------------------------


def test_full_queue_refuses_before_decoding_the_upload(tmp_path):
    """Refusing must cost less than serving, or overload feeds itself: with the queue full, a
    request is answered 503 + Retry-After before its upload is decoded (an undecodable one here,
    which would otherwise be a 415), and once the queue drains the service works again."""
    folder = save_tiny_captioner(tmp_path / "cap")
    app = create_app(
        settings(caption_model=folder, max_batch_size=1, max_queue=1, max_batch_images=1)
    )
    not_an_image = b"not an image at all" * 10
    with TestClient(app) as client:
        gated = gate_captioner(client)
        batcher = client.app.state.services["captioner"].batcher
        responses = {}

        def send(name: str, data: bytes) -> None:
            responses[name] = caption(client, data)

        threads = [threading.Thread(target=send, args=("running", png(1)))]
        threads[0].start()
        assert gated.entered.wait(10)  # the first request holds the model ...
        threads.append(threading.Thread(target=send, args=("queued", png(2))))
        threads[1].start()
        deadline = time.monotonic() + 10
        while batcher.depth < 1 and time.monotonic() < deadline:  # ... and the second waits
            time.sleep(0.005)
        assert batcher.depth == 1

        refused = caption(client, not_an_image)
        assert "queue is full" in assert_error(refused, 503)
        assert int(refused.headers["Retry-After"]) > 0

        gated.gate.set()
        for t in threads:
            t.join(20)
        assert [responses[n].status_code for n in ("running", "queued")] == [200, 200]
        assert_error(caption(client, not_an_image), 415)  # with room, the upload is decoded
        assert caption(client, png(3)).status_code == 200


# -- fuzzing: whatever the bytes, never a 500 -------------------------------------------------

FUZZ = hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SEEDS = [encode(noise_image(20, size=(16, 12)), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP")]


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_are_never_a_server_error(client, data):
    response = caption(client, data, query="?max_length=2&attention=none")
    assert response.status_code in (200, 413, 415), response.text


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(1, 10_000),
)
def test_damaged_images_are_never_a_server_error(client, seed, flips, cut):
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    response = caption(client, bytes(data[:cut]), query="?max_length=2&attention=png")
    assert response.status_code in (200, 413, 415), response.text
    if response.status_code != 200:
        assert isinstance(response.json()["detail"], str)
