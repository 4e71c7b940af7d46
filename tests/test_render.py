"""The pictures of a segmentation: the overlay blended in blocks of rows (several blocks for each shape below but
the small ones) equals the whole-image blend."""

import numpy as np
import pytest

from trident_core.render import OVERLAY_BLOCK, overlay


def whole_blend(image: np.ndarray, colors: np.ndarray, alpha: float) -> np.ndarray:
    """The blend of every pixel at once, in float32, rounded half to even (the formula the overlay keeps)."""
    out = image.astype(np.float32) * np.float32(1 - alpha) + colors.astype(np.float32) * np.float32(alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(2 * (OVERLAY_BLOCK // 111) + 5, 37, 3), (OVERLAY_BLOCK // 24 - 1, 8, 3),
                                   (1, 1, 3), (2 * (OVERLAY_BLOCK // 3) + 7, 3), (200, 3), (0, 3)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_in_blocks_of_rows_is_the_whole_blend(shape, alpha):
    rng = np.random.default_rng(len(shape) * 1000 + shape[0])
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    colors = rng.integers(0, 256, shape, dtype=np.uint8)
    got = overlay(image, colors, alpha)
    assert got.dtype == np.uint8 and got.shape == shape
    assert np.array_equal(got, whole_blend(image, colors, alpha))
    assert np.array_equal(overlay(image, colors, 0.0), image) and np.array_equal(overlay(image, colors, 1.0), colors)


def test_overlay_of_one_colour_broadcast_over_pixels():
    """A single colour given for every pixel (the tracked objects' overlay) blends as the full colour map would."""
    pixels = np.random.default_rng(3).integers(0, 256, (150, 3), dtype=np.uint8)
    colour = np.array([250, 7, 128], np.uint8)
    got = overlay(pixels, np.broadcast_to(colour, pixels.shape), 0.5)
    assert np.array_equal(got, whole_blend(pixels, np.tile(colour, (150, 1)), 0.5))
