"""PIL's bilinear resize of RGB uint8 images, bit for bit, as tensor products on any device.

segment_anything resizes every image for SAM's encoder with PIL on the host (`ResizeLongestSide.apply_image`);
on a GPU host that took 13 ms of each frame's ~50 (issue #25's profile), so there the same pixels are computed on
the GPU. The coefficients are Pillow's own (Resample.c: `precompute_coeffs`, `normalize_coeffs_8bpc`) in the same
double arithmetic, and its two passes (each rounded to uint8; Pillow 13 runs the vertical one first where the
height shrinks more than twice as much as the width) are products of integers in float64, which are exact: each
sum stays far below 2**53. `agrees_with_pil` checks a size against the installed Pillow before it is trusted."""

from __future__ import annotations

import numpy as np
import PIL
import torch
from PIL import Image

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 - 2
CACHE_BYTES = 64 * 2**20  # coefficient matrices a cache keeps (a video's size: two of a few MB)
VERTICAL_FIRST_FROM = 13  # Pillow's major version that runs the vertical pass first when it shrinks more


def _bilinear(x: float) -> float:
    """Pillow's bilinear filter (a triangle of support 1)."""
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


def _coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point bilinear coefficients from `in_size` to `out_size` pixels, as a dense
    [out_size, in_size] float64 matrix of integers (each row: its few taps, the rest 0)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ss = 1.0 / filterscale
    out = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        weights = [_bilinear((x + xmin - center + 0.5) * ss) for x in range(count)]
        total = 0.0
        for w in weights:  # (summed in order, as Pillow does)
            total += w
        for x, w in enumerate(weights):
            k = w / total if total != 0.0 else w
            out[xx, xmin + x] = int(-0.5 + k * (1 << PRECISION_BITS)) if k < 0 else int(0.5 + k * (1 << PRECISION_BITS))
    return out


def _matrix(in_size: int, out_size: int, device: torch.device, cache: dict | None) -> torch.Tensor:
    """`_coefficients` as a tensor on `device`, kept in `cache` (made per frame, it cost the host 0.4 ms and a
    copy of 3.7 MB): at most CACHE_BYTES of them, those of another device dropped."""
    key = (in_size, out_size, device)
    if cache is not None and key in cache:
        return cache[key]
    matrix = torch.from_numpy(_coefficients(in_size, out_size)).to(device)
    if cache is not None:
        held = sum(t.numel() * t.element_size() for k, t in cache.items() if isinstance(t, torch.Tensor))
        if held + matrix.numel() * matrix.element_size() > CACHE_BYTES or any(
                k[2] != device for k in cache if len(k) == 3):
            cache.clear()
        cache[key] = matrix
    return matrix


def vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int], pillow: str | None = None) -> bool:
    """Whether Pillow `pillow` (default: the installed one) runs the vertical pass first for this resize (from 13:
    the height shrinks, by more than twice what the width shrinks)."""
    (h_in, w_in), (h, w) = in_hw, out_hw
    pillow = pillow or PIL.__version__
    return int(pillow.split(".")[0]) >= VERTICAL_FIRST_FROM and 0 < h_in - h and h_in - h > 2 * (w_in - w)


def _to_uint8_range(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 of fixed-point sums (its rounding half added first), still as float64 integers 0..255."""
    return torch.floor((sums + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp_(0, 255)


def pil_bilinear_resize(image: torch.Tensor, size: tuple[int, int], cache: dict | None = None,
                        pillow: str | None = None) -> torch.Tensor:
    """`PIL.Image.resize((w, h), BILINEAR)` of an RGB uint8 image [H, W, 3] to size (h, w) as Pillow `pillow`
    (default: the installed one) computes it, computed where the image is: [h, w, 3] uint8. `cache`: a dict its
    coefficient matrices are kept in, owned by the caller (a model: freed with it)."""
    h_in, w_in = image.shape[:2]
    h, w = size
    if (h, w) == (h_in, w_in):
        return image.clone()
    x = image.permute(2, 0, 1).double()  # [3, H, W]

    def horizontal(x: torch.Tensor) -> torch.Tensor:
        return x if w == w_in else _to_uint8_range(x @ _matrix(w_in, w, image.device, cache).T)

    def vertical(x: torch.Tensor) -> torch.Tensor:
        return x if h == h_in else _to_uint8_range(_matrix(h_in, h, image.device, cache) @ x)

    x = horizontal(vertical(x)) if vertical_first((h_in, w_in), (h, w), pillow) else vertical(horizontal(x))
    return x.to(torch.uint8).permute(1, 2, 0).contiguous()


def agrees_with_pil(in_hw: tuple[int, int], out_hw: tuple[int, int], device: torch.device,
                    cache: dict | None = None) -> bool:
    """Whether `pil_bilinear_resize` on `device` gives the installed Pillow's pixels for this size, on noise over
    a ramp (every tap and rounding exercised); the answer is kept in `cache`. A Pillow that computes otherwise
    (another version, a SIMD fork) is then used as it is."""
    key = ("agrees", tuple(in_hw), tuple(out_hw), device)
    if cache is None or key not in cache:
        rng = np.random.default_rng(sum(in_hw) * 7 + sum(out_hw))
        probe = rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8)
        probe[in_hw[0] // 2:] = np.linspace(0, 255, in_hw[1]).astype(np.uint8)[None, :, None]
        want = np.asarray(Image.fromarray(probe).resize(out_hw[::-1], Image.BILINEAR))
        got = pil_bilinear_resize(torch.from_numpy(probe).to(device), out_hw, cache).cpu().numpy()
        answer = bool(np.array_equal(got, want))
        if cache is None:
            return answer
        cache[key] = answer
    return cache[key]
