"""PIL's bilinear resize as tensor products (`pil_resize`, what SAM's input takes on a GPU) against PIL itself and
segment_anything's ResizeLongestSide: equal bit for bit, up and down, odd sizes, one side unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from trident_core import pil_resize
from trident_core.pil_resize import pil_bilinear_resize


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Noise above a smooth ramp: both the rounding of sharp edges and of slow gradients."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 2:] = np.linspace(0, 255, w).astype(np.uint8)[None, :, None]
    return img


@pytest.mark.parametrize(("size", "out"), [((448, 448), (1024, 1024)), ((1080, 1920), (576, 1024)),
                                           ((37, 53), (715, 1024)), ((1, 5), (205, 1024)),
                                           ((500, 333), (1024, 682)), ((1024, 2048), (512, 1024)),
                                           ((64, 64), (64, 1024)), ((300, 64), (1024, 64)), ((97, 131), (97, 131)),
                                           # the height shrinking more than twice the width: Pillow 13 goes
                                           # vertically first
                                           ((29, 44), (11, 59)), ((2100, 1000), (1024, 488)),
                                           ((2362, 365), (1024, 158))])
def test_equals_pil_bit_for_bit(size, out):
    img = _image(*size, seed=sum(size))
    want = np.array(Image.fromarray(img).resize(out[::-1], Image.BILINEAR))
    got = pil_bilinear_resize(torch.from_numpy(img), out)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (*out, 3)
    assert np.array_equal(got.numpy(), want)


def test_equals_sams_resize_longest_side():
    for h, w in ((448, 600), (720, 1280), (1500, 1000), (2100, 1000), (2362, 365)):
        img = _image(h, w, seed=h)
        want = ResizeLongestSide(1024).apply_image(img)
        assert np.array_equal(pil_bilinear_resize(torch.from_numpy(img), want.shape[:2]).numpy(), want)


def test_the_input_is_left_as_it_is():
    img = torch.from_numpy(_image(40, 60, seed=1))
    before = img.clone()
    same = pil_bilinear_resize(img, (40, 60))
    pil_bilinear_resize(img, (80, 120))
    assert torch.equal(img, before) and torch.equal(same, img) and same.data_ptr() != img.data_ptr()


def test_a_cache_keeps_one_devices_matrices_up_to_a_size():
    img = torch.from_numpy(_image(30, 40, seed=2))
    cache = {}
    first = pil_bilinear_resize(img, (60, 90), cache)
    assert set(cache) == {(40, 90, img.device), (30, 60, img.device)}
    kept = dict(cache)
    assert torch.equal(pil_bilinear_resize(img, (60, 90), cache), first)
    assert all(cache[k] is kept[k] for k in kept)  # (reused, not made again)
    big = torch.from_numpy(_image(2, 3000, seed=3))
    pil_bilinear_resize(big, (2, 2900), cache)  # 66 MB of float64: more than CACHE_BYTES, so the others go
    assert set(cache) == {(3000, 2900, img.device)}
    cache[(1, 1, torch.device("meta"))] = torch.empty(1, 1, device="meta")  # another device's: all dropped
    pil_bilinear_resize(img, (61, 91), cache)
    assert set(cache) == {(40, 91, img.device), (30, 61, img.device)}


def test_pillows_pass_order_by_version():
    assert pil_resize.vertical_first((29, 44), (11, 59), "13.0.0")  # 18 rows fewer, 15 columns more
    assert not pil_resize.vertical_first((29, 44), (11, 59), "12.1.0")
    assert not pil_resize.vertical_first((1500, 1000), (1024, 683), "13.0.0")  # 476 rows vs 2 x 317 columns
    assert not pil_resize.vertical_first((448, 448), (1024, 1024), "13.0.0")  # (growing)


def test_a_size_is_checked_against_the_installed_pillow(monkeypatch):
    cache = {}
    assert pil_resize.agrees_with_pil((2100, 1000), (1024, 488), torch.device("cpu"), cache)
    assert cache[("agrees", (2100, 1000), (1024, 488), torch.device("cpu"))] is True
    # a Pillow that computes otherwise (here: taken for one that still goes horizontally first) is caught
    monkeypatch.setattr(pil_resize, "VERTICAL_FIRST_FROM", 99)
    assert not pil_resize.agrees_with_pil((2100, 1000), (1024, 488), torch.device("cpu"))
    assert pil_resize.agrees_with_pil((448, 600), (764, 1024), torch.device("cpu"))  # (same order either way)
