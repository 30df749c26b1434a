"""Attention heatmaps over images: what the service returns for `attention=png`.

    overlay = attention_overlay(image, attention_map)       # RGB, same size as image
    text = overlay_png_base64(image, attention_map)         # base64 PNG, longer side <= 384

The colormap is viridis (dark purple = no attention, yellow = the most), built in code from its
published anchor colours so that matplotlib is not needed.
"""

from __future__ import annotations

import base64
import io
from numbers import Integral, Real

import numpy as np
from PIL import Image

from captioner.image import to_rgb

# Viridis (van der Walt and Smith, matplotlib's default colormap) at 0, 1/4, 1/2, 3/4 and 1;
# linear interpolation between them stays close to the full table.
_VIRIDIS_ANCHORS = np.array(
    [
        [0x44, 0x01, 0x54],
        [0x3B, 0x52, 0x8B],
        [0x21, 0x91, 0x8C],
        [0x5E, 0xC9, 0x62],
        [0xFD, 0xE7, 0x25],
    ],
    dtype=np.float64,
)
_STOPS = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
VIRIDIS = (
    np.stack(
        [np.interp(np.linspace(0.0, 1.0, 256), _STOPS, _VIRIDIS_ANCHORS[:, c]) for c in range(3)],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)  # (256, 3)


def _check_attention(attention: np.ndarray) -> np.ndarray:
    values = np.asarray(attention, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"attention must be a non-empty 2-D (h, w) map, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("attention must be finite; it contains NaN or infinity")
    if (values < 0).any():
        raise ValueError(f"attention must be non-negative; its minimum is {values.min():g}")
    return values


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")


def attention_overlay(image: Image.Image, attention: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Colour `attention` (h, w) with viridis and blend it over `image` with opacity `alpha`.

    The map is divided by its maximum (an all-zero map stays cold) and upsampled bilinearly to
    the image size. Returns an RGB image of the image's size.
    """
    values = _check_attention(attention)
    _check_alpha(alpha)
    image = to_rgb(image)
    peak = values.max()
    normalised = (values / peak if peak > 0 else values).astype(np.float32)
    heat = Image.fromarray(normalised, mode="F").resize(image.size, Image.Resampling.BILINEAR)
    indices = np.clip(np.rint(np.asarray(heat) * 255.0), 0, 255).astype(np.uint8)  # (H, W)
    coloured = Image.fromarray(VIRIDIS[indices], mode="RGB")
    return Image.blend(image, coloured, float(alpha))


def overlay_png_base64(
    image: Image.Image, attention: np.ndarray, alpha: float = 0.5, max_side: int = 384
) -> str:
    """`attention_overlay` on the image shrunk so its longer side is at most `max_side`, as a
    base64-encoded PNG (an ASCII string)."""
    if not isinstance(max_side, Integral) or isinstance(max_side, bool) or max_side < 1:
        raise ValueError(f"max_side must be a positive int, got {max_side!r}")
    values = _check_attention(attention)
    _check_alpha(alpha)
    image = to_rgb(image)
    width, height = image.size
    scale = max_side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    attention_overlay(image, values, alpha).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
