"""Safe image decoding, and the one preprocessing function that training and serving share.

    image = load_image(upload_bytes)           # RGB, EXIF-rotated, first frame, pixel cap checked
    batch = preprocess_batch([image], 224)     # (B, 3, 224, 224) float32, ImageNet-normalised
    images = as_images([pil_image, b"...", "photo.jpg"])   # what the models accept, as RGB images

Every failure to decode becomes an `ImageError` (a `ValueError`): `UnreadableImageError` for data
that is not an image we accept, `ImageTooLargeError` when the pixel cap is exceeded. The cap is
checked against the header before any pixel data is decoded, so decompression bombs cost nothing.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 40_000_000
# What an upload may be. Restricting PIL to these keeps rarely used (and rarely hardened) decoders
# away from untrusted bytes, as Pillow's docs advise for `Image.open(formats=...)`. PNG covers APNG,
# JPEG covers MPO (phone cameras).
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "PPM")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(ValueError):
    """The input is not an image this library accepts."""


class UnreadableImageError(ImageError):
    """Not a decodable image: empty, not an image, truncated, corrupt, or an unsupported format."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the cap allows."""


ImageSource = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` (bytes, a path, or a binary file object) to a fully loaded RGB image.

    The EXIF orientation is applied, animated images give their first frame, and transparent
    pixels are composited on white. A path that cannot be opened (missing, a directory, no
    permission) raises `UnreadableImageError` naming the path, not `OSError`. A file object is
    read from its current position and is not closed. Pillow's own hard limit (twice
    `Image.MAX_IMAGE_PIXELS`, about 179 MP) applies too, whatever `max_pixels` says.
    """
    if not isinstance(max_pixels, Integral) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            fp = path.open("rb")
        except OSError as exc:
            raise UnreadableImageError(
                f"cannot open image file {str(path)!r}: {exc.strerror}"
            ) from exc
        with fp:
            return _decode(fp, max_pixels)
    if not hasattr(source, "read"):
        raise TypeError(f"source must be bytes, a path or a binary file object, got {type(source)}")
    seekable = getattr(source, "seekable", None)
    if not (callable(seekable) and seekable()):
        return _decode(io.BytesIO(source.read()), max_pixels)
    return _decode(source, max_pixels)


def _decode(fp: BinaryIO, max_pixels: int) -> Image.Image:
    Image.init()  # registers every plugin (idempotent); `formats=` only sees registered ones
    try:
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; our own cap is
        # the one that counts, so its warning is silenced and its error becomes ours.
        # (catch_warnings swaps process-wide filters, so it is not thread-safe: with concurrent
        # calls these filters may linger or lapse early; at worst a Pillow warning gets printed.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Corrupt metadata (EXIF, TIFF tags) makes Pillow warn; the pixels may still be fine.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(fp, formats=FORMATS) as im:
                _check_size(im.size, max_pixels)  # header only: no pixel data decoded yet
                im.load()
                image = _exif_transpose(im)
                _check_size(image.size, max_pixels)
                return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnreadableImageError(
            f"not a recognised image (supported formats: {', '.join(FORMATS)})"
        ) from exc
    except MemoryError:  # the server's problem, not the input's (the pixel cap bounds memory)
        raise
    except Exception as exc:  # any decoder failure: OSError, SyntaxError, struct.error, EOFError...
        reason = str(exc)[:200] or type(exc).__name__
        raise UnreadableImageError(f"corrupt or truncated image: {reason}") from exc


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise UnreadableImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, over the cap of {max_pixels}"
        )


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF: keep the pixels, ignore the orientation
        return im


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: high bit depths scaled to 8 bits, transparency composited on white."""
    if image.mode in _HIGH_DEPTH_MODES:
        image = _high_depth_to_8bit(image)
    if image.mode == "La":  # premultiplied; Pillow converts it only to LA
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit and float greyscale to "L" (or "LA" when a transparent value is set).

    I;16 modes are scaled by 255/65535. The range of "I" and "F" is not fixed by the mode, so it is
    read from the values: within [0, 1] (F only) times 255, within [0, 255] as is, within
    [0, 65535] (I only: how Pillow stores 16-bit data) divided by 257, otherwise min-max stretched.
    """
    values = np.asarray(image).astype(np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    lo, hi = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = values
    elif image.mode == "I" and lo >= 0 and hi <= 65535:
        scaled = values / 257.0
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = np.where(np.asarray(image) == transparent, 0, 255).astype(np.uint8)
        grey = Image.merge("LA", (grey, Image.fromarray(alpha, mode="L")))
    return grey


def _check_input_size(size: int) -> None:
    if not isinstance(size, Integral) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def resize(image: Image.Image, size: int) -> torch.Tensor:
    """Image to a `(3, size, size)` uint8 tensor: squashed (no crop), antialiased bilinear."""
    _check_input_size(size)
    if image.mode != "RGB":
        image = to_rgb(image)
    resized = image.resize((int(size), int(size)), Image.Resampling.BILINEAR)  # antialiased in PIL
    return torch.from_numpy(np.asarray(resized).transpose(2, 0, 1).copy())  # (3, size, size)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 `(..., 3, H, W)` to float32 scaled to [0, 1] and normalised with the ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """The one preprocessing of training and serving: `normalize(resize(image, size))`, (3, S, S)."""
    return normalize(resize(image, size))


def preprocess_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """`preprocess` each image and stack: `(B, 3, size, size)`."""
    _check_input_size(size)
    if len(images) == 0:
        return torch.empty(0, 3, int(size), int(size))
    return torch.stack([preprocess(image, size) for image in images])


ImageInput = Image.Image | bytes | str | os.PathLike  # what the models' caption/answer take


def as_images(
    images: Sequence[ImageInput], max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Image.Image]:
    """PIL images converted to RGB, encoded bytes and paths decoded with `load_image`."""
    return [
        to_rgb(im) if isinstance(im, Image.Image) else load_image(im, max_pixels) for im in images
    ]
