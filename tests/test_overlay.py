import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.overlay import VIRIDIS, attention_overlay, overlay_png_base64


def grey_image(width: int = 64, height: int = 48) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


def hot_top_left() -> np.ndarray:
    attention = np.zeros((4, 4))
    attention[0, 0] = 3.0  # the scale does not matter: the map is divided by its maximum
    return attention


def test_overlay_size_and_mode():
    overlay = attention_overlay(grey_image(), hot_top_left())
    assert overlay.mode == "RGB"
    assert overlay.size == (64, 48)
    assert attention_overlay(Image.new("LA", (10, 7)), np.ones((2, 3))).size == (10, 7)


def test_hottest_region_is_coloured_differently_from_the_coldest():
    overlay = np.asarray(attention_overlay(grey_image(), hot_top_left(), alpha=1.0)).astype(int)
    hot, cold = overlay[0, 0], overlay[-1, -1]
    assert np.abs(hot - VIRIDIS[255]).max() <= 1  # yellow where attention peaks
    assert np.abs(cold - VIRIDIS[0]).max() <= 1  # dark purple where there is none
    assert np.abs(hot - cold).sum() > 200


def test_alpha_blends_between_image_and_heatmap():
    image = grey_image()
    assert np.array_equal(
        np.asarray(attention_overlay(image, hot_top_left(), 0.0)), np.asarray(image)
    )
    half = np.asarray(attention_overlay(image, hot_top_left(), 0.5)).astype(int)
    assert np.abs(half[-1, -1] - (np.array([128, 128, 128]) + VIRIDIS[0]) / 2).max() <= 1


def test_upsampling_is_smooth():
    attention = np.array([[0.0, 1.0]])
    row = np.asarray(attention_overlay(grey_image(40, 4), attention, alpha=1.0))[2]
    assert len({tuple(p) for p in row}) > 5  # a gradient, not two flat blocks


def test_all_zero_map_and_torch_tensor_are_accepted():
    cold = np.asarray(attention_overlay(grey_image(), np.zeros((3, 3)), alpha=1.0))
    assert (cold == VIRIDIS[0]).all()
    from_tensor = attention_overlay(grey_image(), torch.tensor(hot_top_left()))
    assert np.array_equal(
        np.asarray(from_tensor), np.asarray(attention_overlay(grey_image(), hot_top_left()))
    )


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [((1000, 500), 384, (384, 192)), ((300, 900), 100, (33, 100)), ((50, 40), 384, (50, 40))],
)
def test_base64_png_has_the_capped_size(size, max_side, expected):
    text = overlay_png_base64(grey_image(*size), hot_top_left(), max_side=max_side)
    assert isinstance(text, str) and text.isascii()
    data = base64.b64decode(text, validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert decoded.size == expected
    assert decoded.mode == "RGB"


@pytest.mark.parametrize(
    ("attention", "match"),
    [
        (np.ones(5), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.ones((0, 3)), "2-D"),
        (np.array([[1.0, np.nan]]), "finite"),
        (np.array([[1.0, np.inf]]), "finite"),
        (np.array([[1.0, -0.5]]), "non-negative"),
    ],
)
def test_bad_maps_raise_value_error(attention, match):
    with pytest.raises(ValueError, match=match):
        attention_overlay(grey_image(), attention)
    with pytest.raises(ValueError, match=match):
        overlay_png_base64(grey_image(), attention)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5"])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        attention_overlay(grey_image(), hot_top_left(), alpha)


@pytest.mark.parametrize("max_side", [0, -1, 2.0])
def test_bad_max_side(max_side):
    with pytest.raises(ValueError, match="max_side"):
        overlay_png_base64(grey_image(), hot_top_left(), max_side=max_side)
