"""Attention maps in the response: none, raw grids, or PNG heatmaps over the uploaded image."""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np
from PIL import Image

from captioner.overlay import overlay_png_base64

DECIMALS = 6


class AttentionFormat(str, Enum):
    none = "none"
    grid = "grid"
    png = "png"


def attention_payload(
    fmt: AttentionFormat, maps: np.ndarray | None, image: Image.Image
) -> dict[str, Any] | None:
    """`maps` (T, h, w) or (h, w) -> the DESIGN's attention object, or None.

    `grid`: {"height", "width", "maps": [T][h][w]} with each map summing to 1 (rounded to 6
    decimals); `png`: {"height", "width", "overlays": [T base64 PNGs]} drawn over `image`.
    PNG encoding is CPU work: call this in a worker thread.
    """
    if fmt is AttentionFormat.none or maps is None:
        return None
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"attention must be (T, h, w) or (h, w), got shape {maps.shape}")
    _, height, width = maps.shape
    if fmt is AttentionFormat.grid:
        return {"height": height, "width": width, "maps": np.round(maps, DECIMALS).tolist()}
    overlays = [overlay_png_base64(image, m) for m in maps]
    return {"height": height, "width": width, "overlays": overlays}
