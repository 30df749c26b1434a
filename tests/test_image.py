import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.image import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    ImageTooLargeError,
    UnreadableImageError,
    load_image,
    preprocess,
    preprocess_batch,
    to_rgb,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int, idat: bytes = b"not zlib data") -> bytes:
    """A tiny PNG whose header claims width x height; its pixel data is garbage."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel(xy))


def close_to(actual, expected, tol: int = 8) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


# (mode, fill value, format, expected RGB)
MODES = [
    ("L", 128, "PNG", (128, 128, 128)),
    ("LA", (0, 255), "PNG", (0, 0, 0)),
    ("LA", (0, 0), "PNG", WHITE),  # fully transparent -> white background
    ("RGBA", (255, 0, 0, 128), "PNG", (255, 127, 127)),  # half red over white
    ("RGBA", (0, 0, 255, 255), "WEBP", BLUE),
    ("CMYK", (0, 255, 255, 0), "JPEG", RED),
    ("1", 1, "PNG", WHITE),
    ("1", 0, "BMP", (0, 0, 0)),
    ("RGB", GREEN, "TIFF", GREEN),
    ("RGB", BLUE, "GIF", BLUE),
]


@pytest.mark.parametrize(("mode", "fill", "fmt", "expected"), MODES)
def test_modes_decode_to_rgb(mode, fill, fmt, expected):
    data = encode(
        Image.new(mode, (7, 5), fill), fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    image = load_image(data)
    assert image.mode == "RGB"
    assert image.size == (7, 5)
    assert close_to(pixel(image, (3, 2)), expected, tol=2 if fmt != "JPEG" else 8)


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    opaque = load_image(encode(palette, "PNG"))
    assert pixel(opaque, (0, 0)) == (0, 0, 0)
    assert pixel(opaque, (5, 3)) == RED
    transparent = load_image(encode(palette, "PNG", transparency=0))
    assert transparent.mode == "RGB"
    assert pixel(transparent, (0, 0)) == WHITE  # transparent index composited on white
    assert pixel(transparent, (5, 3)) == RED


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_scales_to_8_bit(mode):
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    image16 = Image.frombytes(
        mode, (4, 1), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    )
    fmt = "PNG" if mode == "I;16" else "TIFF"
    image = load_image(encode(image16, fmt))
    assert image.mode == "RGB"
    grey = np.asarray(image)[0, :, 0].tolist()
    assert grey == [0, 100, 128, 255]  # scaled by 255/65535, not clipped at 255


def test_32_bit_int_and_float_images():
    ints = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert ints.mode == "I"
    assert np.asarray(load_image(encode(ints, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(load_image(encode(floats, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-5.0, 0.0, 1000.0]], dtype=np.float32))  # min-max stretched
    assert np.asarray(load_image(encode(wide, "TIFF")))[0, :, 0].tolist() == [0, 1, 255]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 10, 10))  # red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    loaded = load_image(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert loaded.size == (20, 40)
    assert close_to(pixel(loaded, (15, 4)), RED, tol=30)  # top-left went to top-right
    assert close_to(pixel(loaded, (4, 4)), BLUE, tol=30)
    assert close_to(pixel(loaded, (15, 35)), BLUE, tol=30)


def test_corrupt_exif_does_not_make_the_image_unreadable():
    # A description tag pointing past the end of the EXIF block: Pillow warns (an error under
    # pytest) and skips the tag; the orientation beside it is still applied.
    entries = [(0x010E, 2, 100, 1000), (0x0112, 3, 1, 6)]
    ifd = struct.pack("<H", 2) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 10, 10))
    loaded = load_image(encode(image, "JPEG", quality=95, exif=exif))
    assert loaded.size == (20, 40)
    assert close_to(pixel(loaded, (15, 4)), RED, tol=30)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_the_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **extra)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert pixel(load_image(data), (4, 4)) == RED


def test_one_pixel_image():
    image = load_image(encode(Image.new("RGB", (1, 1), GREEN), "PNG"))
    assert image.size == (1, 1)
    assert pixel(image, (0, 0)) == GREEN


def test_pixel_cap_is_checked_from_the_header_before_decoding():
    # The pixel data is garbage: decoding it first would raise UnreadableImageError instead.
    with pytest.raises(ImageTooLargeError, match=r"8000x8000 = 64000000 pixels.*40000000"):
        load_image(png_header_only(8000, 8000))
    assert DEFAULT_MAX_PIXELS == 40_000_000


@pytest.mark.parametrize("side", [12_000, 30_000])  # above Pillow's warning and error limits
def test_decompression_bomb_raises_our_error_not_pillows(side):
    bomb = png_header_only(side, side, idat=zlib.compress(b"\x00" * 100_000))
    assert len(bomb) < 1000
    with pytest.raises(ImageTooLargeError, match="pixels"):
        load_image(bomb)
    with pytest.raises(ImageTooLargeError):  # Pillow's own hard limit still applies
        load_image(png_header_only(30_000, 30_000), max_pixels=10**10)


def test_custom_max_pixels():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageTooLargeError, match="100x100 = 10000 pixels.*9999"):
        load_image(data, max_pixels=9_999)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(data, max_pixels=0)


def jpeg_bytes() -> bytes:
    gradient = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    return encode(Image.fromarray(gradient), "JPEG")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is a text file\n",
        jpeg_bytes()[: len(jpeg_bytes()) // 2],
        random.Random(0).randbytes(5000),
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        encode(Image.new("RGB", (4, 4)), "PCX"),  # a real image, but not an accepted format
    ],
    ids=["empty", "text", "truncated-jpeg", "random", "broken-png", "pcx"],
)
def test_unreadable_bytes(data):
    with pytest.raises(UnreadableImageError) as info:
        load_image(data)
    assert isinstance(info.value, ImageError)
    assert isinstance(info.value, ValueError)


def test_path_sources(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes())
    from_path, from_str = load_image(path), load_image(str(path))
    path.unlink()  # fully loaded: the pixels no longer need the file
    assert from_path.size == from_str.size == (64, 48)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_str))
    with pytest.raises(UnreadableImageError, match="photo.jpg"):
        load_image(path)
    with pytest.raises(UnreadableImageError, match="cannot open"):
        load_image(tmp_path)  # a directory


def test_file_object_sources(tmp_path):
    data = jpeg_bytes()
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with path.open("rb") as fp:
        image = load_image(fp)
        assert not fp.closed  # the caller's file is left open
    assert image.size == (64, 48)

    class Stream(io.RawIOBase):  # not seekable, like a socket or pipe
        def __init__(self, payload: bytes):
            self.inner = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            chunk = self.inner.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    assert np.array_equal(np.asarray(load_image(Stream(data))), np.asarray(image))
    assert np.array_equal(np.asarray(load_image(io.BytesIO(data))), np.asarray(image))
    assert np.array_equal(np.asarray(load_image(bytearray(data))), np.asarray(image))


def expected_value(channel_value: float) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return ((channel_value - mean) / std).view(3, 1, 1)


def unnormalize(pixels: torch.Tensor) -> torch.Tensor:
    """What `normalize` undoes: back to [0, 1] values (the check of preprocessing below)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels * std + mean


def test_preprocess_shape_dtype_and_normalisation():
    white = preprocess(Image.new("RGB", (10, 7), WHITE), 16)
    assert white.shape == (3, 16, 16)
    assert white.dtype == torch.float32
    assert torch.allclose(white, expected_value(1.0).expand(3, 16, 16), atol=1e-6)
    black = preprocess(Image.new("RGB", (3, 30), (0, 0, 0)), 5)
    assert torch.allclose(black, expected_value(0.0).expand(3, 5, 5), atol=1e-6)
    assert torch.allclose(unnormalize(white), torch.ones(3, 16, 16), atol=1e-6)


def test_preprocess_squashes_without_cropping():
    image = Image.new("RGB", (40, 10), RED)
    image.paste(BLUE, (20, 0, 40, 10))  # left half red, right half blue
    pixels = unnormalize(preprocess(image, 8))
    assert torch.allclose(pixels[:, :, 0], torch.tensor([1.0, 0.0, 0.0]).view(3, 1), atol=1e-6)
    assert torch.allclose(pixels[:, :, -1], torch.tensor([0.0, 0.0, 1.0]).view(3, 1), atol=1e-6)


def test_preprocess_treats_other_modes_like_load_image():
    rgba = Image.new("RGBA", (6, 6), (255, 0, 0, 128))
    assert torch.equal(preprocess(rgba, 4), preprocess(load_image(encode(rgba, "PNG")), 4))
    assert torch.equal(preprocess(rgba, 4), preprocess(to_rgb(rgba), 4))


def test_preprocess_batch_equals_stacked_preprocess():
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(20, 30), (50, 10), (8, 8)]
    ]
    batch = preprocess_batch(images, 12)
    assert batch.shape == (3, 3, 12, 12)
    assert torch.equal(batch, torch.stack([preprocess(image, 12) for image in images]))
    assert preprocess_batch([], 12).shape == (0, 3, 12, 12)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "224"])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size must be a positive int"):
        preprocess(Image.new("RGB", (4, 4)), size)
    with pytest.raises(ValueError, match="size must be a positive int"):
        preprocess_batch([Image.new("RGB", (4, 4))], size)
