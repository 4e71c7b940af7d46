"""PIL's bilinear resize of RGB uint8 images, bit for bit, as tensor products on any device.

segment_anything resizes every image for SAM's encoder with PIL on the host (`ResizeLongestSide.apply_image`);
on a GPU host that took 13 ms of each frame's ~50 (issue #25's profile), so there the same pixels are computed on
the GPU. The coefficients are Pillow's own (Resample.c: `precompute_coeffs`, `normalize_coeffs_8bpc`) in the same
double arithmetic, and its two passes (horizontal, then vertical, each rounded to uint8) are products of integers
in float64, which are exact: each sum stays far below 2**53."""

from __future__ import annotations

import functools

import numpy as np
import torch

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 - 2
MATRICES_KEPT = 8  # coefficient matrices a cache keeps (two per image size: a few MB each on a GPU)


def _bilinear(x: float) -> float:
    """Pillow's bilinear filter (a triangle of support 1)."""
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


@functools.lru_cache(maxsize=16)
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
    """`_coefficients` as a tensor on `device`, kept in `cache` (a copy to a GPU per frame took 0.4 ms of the
    host's time and 3.7 MB of copying): at most MATRICES_KEPT, those of another device dropped."""
    key = (in_size, out_size, device)
    if cache is None or key not in cache:
        matrix = torch.from_numpy(_coefficients(in_size, out_size)).to(device)
        if cache is None:
            return matrix
        if len(cache) >= MATRICES_KEPT or any(k[2] != device for k in cache):
            cache.clear()
        cache[key] = matrix
    return cache[key]


def _to_uint8_range(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 of fixed-point sums (its rounding half added first), still as float64 integers 0..255."""
    return torch.floor((sums + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp_(0, 255)


def pil_bilinear_resize(image: torch.Tensor, size: tuple[int, int], cache: dict | None = None) -> torch.Tensor:
    """`PIL.Image.resize((w, h), BILINEAR)` of an RGB uint8 image [H, W, 3] to size (h, w), computed where the
    image is: [h, w, 3] uint8, equal to PIL's bit for bit. `cache`: a dict its coefficient matrices are kept in,
    owned by the caller (a model: freed with it)."""
    h_in, w_in = image.shape[:2]
    h, w = size
    if (h, w) == (h_in, w_in):
        return image.clone()
    x = image.permute(2, 0, 1).double()  # [3, H, W]
    if w != w_in:  # (Pillow's need_horizontal: a pass of identity coefficients is skipped)
        x = _to_uint8_range(x @ _matrix(w_in, w, image.device, cache).T)
    if h != h_in:
        x = _to_uint8_range(_matrix(h_in, h, image.device, cache) @ x)
    return x.to(torch.uint8).permute(1, 2, 0).contiguous()
