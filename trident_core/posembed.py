"""Position-embedding interpolation of DINO and the reference's CLIP: bicubic with scale (g + 0.1) / sqrt(N)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + N, D] (class token first) to [1 + gh*gw, D] as DINO's own formula does it.

    The scale factor, not a target size, drives the resampling; a target-size resize differs by several percent."""
    n = pos.shape[0] - 1
    side = math.sqrt(n)
    if grid == (int(side), int(side)) and int(side) ** 2 == n:
        return pos
    cls, patch = pos[:1], pos[1:]
    dim = patch.shape[-1]
    s = int(side)
    patch = patch.reshape(1, s, s, dim).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side), mode="bicubic")
    if tuple(patch.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"position grid {tuple(patch.shape[-2:])} != {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(-1, dim).to(pos.dtype)
    return torch.cat([cls, patch], dim=0)


def cached_pos_embed(cache: dict, pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`interpolate_pos_embed`, kept in a model's `cache` per grid (every forward asked for the same one: a bicubic
    kernel of 2 ms on a GPU); made again when the weights are other tensors (moved, or reloaded), only the current
    ones' kept. (Weights are never changed in place; ComfyUI's inference tensors keep no version counter.)"""
    key = (tuple(grid), pos.device, pos.dtype, pos.data_ptr())
    if key not in cache:
        if any(k[1:] != key[1:] for k in cache):
            cache.clear()
        cache[key] = interpolate_pos_embed(pos, grid)
    return cache[key]
