"""Position embeddings interpolated to a window's grid (`posembed`): DINO's formula against an independent bicubic
of the same scale factor, and the per-model cache giving what the interpolation gives, made again when the
weights change."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trident_core.posembed import cached_pos_embed, interpolate_pos_embed


def _pos(n_side: int = 14, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(1 + n_side * n_side, dim, generator=torch.Generator().manual_seed(seed))


def test_interpolation_is_dinos_scale_factor_bicubic():
    pos = _pos()
    got = interpolate_pos_embed(pos, (21, 18))
    grid = pos[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(21.1 / math.sqrt(196), 18.1 / math.sqrt(196)), mode="bicubic")
    assert torch.equal(got[0], pos[0]) and torch.equal(got[1:], want.permute(0, 2, 3, 1).reshape(-1, 8))
    assert interpolate_pos_embed(pos, (14, 14)) is pos


def test_the_cache_gives_the_interpolation_and_follows_the_weights():
    pos, cache = _pos(), {}
    first = cached_pos_embed(cache, pos, (21, 21))
    assert torch.equal(first, interpolate_pos_embed(pos, (21, 21)))
    assert cached_pos_embed(cache, pos, (21, 21)) is first  # (made once per grid)
    other = cached_pos_embed(cache, pos, (24, 21))
    assert len(cache) == 2 and torch.equal(other, interpolate_pos_embed(pos, (24, 21)))
    pos = pos * 2.0  # other weights (moved or reloaded): made again from their values, the old ones dropped
    again = cached_pos_embed(cache, pos, (21, 21))
    assert torch.equal(again, interpolate_pos_embed(pos, (21, 21))) and not torch.equal(again, first)
    assert len(cache) == 1
    half = cached_pos_embed(cache, pos.double(), (21, 21))  # another dtype (or device): only its own kept
    assert half.dtype == torch.float64 and len(cache) == 1


def test_the_cache_takes_inference_tensors():
    """ComfyUI runs nodes under inference mode, whose tensors keep no version counter."""
    with torch.inference_mode():
        pos, cache = _pos(), {}
        assert torch.equal(cached_pos_embed(cache, pos[:], (21, 21)), interpolate_pos_embed(pos, (21, 21)))
        assert cached_pos_embed(cache, pos[:], (21, 21)) is cached_pos_embed(cache, pos, (21, 21))
