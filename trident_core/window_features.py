"""S3 + S4: DINO proxy attention over each window, applied to the value path of CLIP's last block.

The models' adapters give DINO's patch tokens and CLIP's last-block values and out-projection; this module holds
the proxy attention between them. Windows are processed in chunks so memory does not grow with the image size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import WindowConfig
from .image import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, device_constant
from .models import ClipModel, DinoModel
from .windows import WindowPlan

WINDOW_CHUNK = 8
CPU_WINDOW_CHUNK = 2


def window_chunk(device: torch.device) -> int:
    """Windows per DINO and CLIP forward on `device`. On the CPU two: each layer's activations then stay a few MB,
    in the cache and reused from the heap, where eight windows' came as fresh memory, page by page (AMD Zen 5,
    voc21 at 1024x1024: CLIP's tower 1.44 -> 1.22 s in float32 and 1.18 -> 1.04 s in bf16; each window's values
    are the same bit for bit). Elsewhere WINDOW_CHUNK, which keeps a GPU busy."""
    return CPU_WINDOW_CHUNK if device.type == "cpu" else WINDOW_CHUNK


@dataclass(frozen=True, eq=False)
class WindowFeatures:
    """CLIP's last-block outputs Y [n, gh*gw, D] per window (on the grid `token_grid`), and where they came from."""

    tokens: torch.Tensor
    token_grid: tuple[int, int]
    plan: WindowPlan
    patch_size: int
    image_size: tuple[int, int]
    processed_size: tuple[int, int]
    image_digest: str = ""  # of the image (`image.image_digest`), where the caller had it
    scale: tuple[int, int] = (0, 0)  # S0's first resize (short_side, long_cap), where the caller had it


def crop_frame_windows(xs: Sequence[torch.Tensor], plan: WindowPlan, idx: range) -> torch.Tensor:
    """Windows `idx` of several frames' windows, numbered frame by frame (window j is frame j // len(plan)'s
    window j % len(plan)), as a batch [k, 3, w, w]."""
    n = len(plan)
    boxes = [(xs[j // n], plan.boxes[j % n]) for j in idx]
    return torch.cat([x[:, :, y1:y2, x1:x2] for x, (y1, x1, y2, x2) in boxes])


def clip_to_imagenet(x: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised windows un-normalised with CLIP's exact constants, then ImageNet-normalised (DINO's input)."""
    cm, cs, im, istd = (device_constant(c, x.device).view(1, 3, 1, 1)
                        for c in (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD))
    return ((x * cs + cm) - im) / istd


def similarity_mean(feats: torch.Tensor) -> torch.Tensor:
    """Mean of the per-window token cosine matrices over all windows and entries: sum_w |sum_i f_i|^2 / (n L^2)."""
    f = F.normalize(feats.float(), dim=-1)
    n, length = f.shape[:2]
    return f.sum(dim=1).pow(2).sum() / (n * length * length)


def proxy_attention(feats: torch.Tensor, mean: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """P = softmax(gamma (S - beta m)) with negative entries masked out; [k, L, L] float32.

    A row with no positive entry (NaN in the reference) falls back to uniform weights over its window."""
    f = F.normalize(feats.float(), dim=-1)
    z = (f @ f.transpose(1, 2) - mean * beta) * gamma
    z = z.masked_fill(z < 0, float("-inf"))
    empty = torch.isinf(z).all(dim=-1, keepdim=True)
    z = torch.where(empty, torch.zeros_like(z), z)
    return z.softmax(dim=-1)


def _resize_tokens(t: torch.Tensor, grid: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of tokens [k, gh*gw, D] to another grid."""
    if grid == new:
        return t
    k, _, d = t.shape
    img = t.transpose(1, 2).reshape(k, d, *grid).float()
    img = F.interpolate(img, size=new, mode="bilinear", align_corners=False)
    return img.flatten(2).transpose(1, 2).to(t.dtype)


@torch.no_grad()
def frame_window_features(clip: ClipModel, dino: DinoModel, xs: Sequence[torch.Tensor], plan: WindowPlan,
                          config: WindowConfig, image_size: tuple[int, int] | None = None, chunk: int = WINDOW_CHUNK,
                          on_chunk=None, after_dino=None, after_block=None) -> list[WindowFeatures]:
    """Y = out_proj(P V) per window of each processed, CLIP-normalised frame x [1, 3, H, W] of `xs` (frames of one
    size: one window plan), with the proxy attention's gamma and beta of `config`. The frames' windows go through
    DINO and CLIP `chunk` at a time, frames mixed within a chunk (a GPU's forwards then carry several frames),
    while the proxy attention's similarity mean stays each frame's own.

    V is resized bilinearly to DINO's grid where the grids differ (ViT-H/14), then Y back to CLIP's grid times
    round(dino/clip) as the reference splices it. DINO runs on every window before CLIP does: `after_dino()` is
    called in between (to release DINO's weights, so the two models' weights are never needed at once), and
    `after_block(block)` after each block of either tower in every chunk (`residency.release`: a tower's weights
    are then resident one block at a time; the next chunk maps them again from the page cache)."""
    n = len(plan)
    total = n * len(xs)
    xs = [x.to(dino.device) for x in xs]  # (each frame copied once; its overlapping windows are cropped there)
    dino_feats = []
    for s in range(0, total, chunk):
        dino_feats.append(dino.patch_tokens(clip_to_imagenet(
            crop_frame_windows(xs, plan, range(s, min(total, s + chunk)))), after_block))
        if on_chunk:
            on_chunk()
    dino_feats = torch.cat(dino_feats)
    if after_dino:
        after_dino()
    means = torch.stack([similarity_mean(dino_feats[f * n:(f + 1) * n]) for f in range(len(xs))])
    dg = plan.window // dino.patch_size
    out = []
    grid = None
    for s in range(0, total, chunk):
        idx = range(s, min(total, s + chunk))
        values, grid = clip.window_values(crop_frame_windows(xs, plan, idx), after_block)
        values = _resize_tokens(values, grid, (dg, dg))
        frames = [j // n for j in idx]
        mean = means[frames[0]] if frames[0] == frames[-1] else means[frames].view(-1, 1, 1)
        p = proxy_attention(dino_feats[s:s + len(idx)], mean, config.gamma, config.beta)
        o = torch.bmm(p, values)  # float32: CLIP's adapter gives V in float32
        out.append(clip.attention_output(o))
        if on_chunk:
            on_chunk()
    tokens = torch.cat(out)
    token_grid = (dg, dg)
    if dg % grid[1] != 0:  # ViT-H/14 (24) with DINO/16 (21): back to CLIP's grid x round(21/24)
        ratio = max(1, round(dg / grid[0]))
        token_grid = (grid[0] * ratio, grid[1] * ratio)
        tokens = _resize_tokens(tokens, (dg, dg), token_grid)
    size = tuple(image_size) if image_size else tuple(xs[0].shape[-2:])
    per_frame = [tokens] if len(xs) == 1 else [t.clone() for t in tokens.split(n)]  # (each frame owns its memory)
    return [WindowFeatures(t, token_grid, plan, clip.patch_size, size, tuple(xs[0].shape[-2:])) for t in per_frame]


def splice(wf: WindowFeatures) -> torch.Tensor:
    """S5: windows' tokens added onto the processed image's token grid (x grid ratio) and averaged, [D, Hg, Wg]."""
    h, w = wf.processed_size
    ratio = wf.token_grid[0] // (wf.plan.window // wf.patch_size)
    gh, gw = h // wf.patch_size * ratio, w // wf.patch_size * ratio
    d = wf.tokens.shape[-1]
    canvas = wf.tokens.new_zeros(d, gh, gw, dtype=torch.float32)
    count = wf.tokens.new_zeros(1, gh, gw, dtype=torch.float32)
    for t, (y1, x1, _, _) in zip(wf.tokens, wf.plan.boxes):
        ys, xs = y1 // wf.patch_size * ratio, x1 // wf.patch_size * ratio
        th, tw = wf.token_grid
        canvas[:, ys:ys + th, xs:xs + tw] += t.float().T.reshape(d, th, tw)
        count[:, ys:ys + th, xs:xs + tw] += 1
    return canvas / count
