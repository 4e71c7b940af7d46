"""S5 + S7: splice the windows, aggregate with SAM's affinity per SAM tile, project to CLIP's embedding space.

A tiling of rows x cols SAM tiles (1x2 is the reference's Cityscapes mode) encodes each tile on its own; the
affinity is then block-diagonal and only its diagonal blocks are ever computed. `segment_then_splice` is the
ProxyCLIP baseline: each window is projected and normalised on its own and the windows are averaged, no SAM."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import AggregateConfig
from .image import round_up_to
from .models import ClipModel, SamEncoding, SamModel
from .sam_affinity import affinity_rows, unit_values
from .window_features import WindowFeatures, splice

MAX_TILES = 8
AUTO_TILE_SIDE = 1024


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """Per-token image features in CLIP's embedding space, [E, h, w], for an image of `image_size` (H, W).

    `sam_encoding` is SAM's encoding of the whole image when one was made (refinement reuses it)."""

    features: torch.Tensor
    image_size: tuple[int, int]
    paradigm: str
    correlation: str
    tiles: tuple[int, int]
    sam_encoding: SamEncoding | None = field(default=None, repr=False)
    sam_tile_encodings: tuple[SamEncoding, ...] = field(default=(), repr=False)


def parse_tiles(spec: str | tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
    """"1x1", "1x2", "RxC" or "auto": tiles about as wide as high and about AUTO_TILE_SIDE pixels (SAM's input
    size), so wide and very large images keep a fine SAM grid."""
    if isinstance(spec, tuple):
        rows, cols = spec
    elif spec.strip().lower() == "auto":
        h, w = image_size
        rows, cols = max(1, round(h / w)), max(1, round(w / h))
        scale = max(1, round(max(h / rows, w / cols) / AUTO_TILE_SIDE))
        rows, cols = min(MAX_TILES, rows * scale), min(MAX_TILES, cols * scale)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", spec)
        if not m:
            raise ValueError(f"SAM tiles must be 'auto' or ROWSxCOLS like '1x2', not {spec!r}")
        rows, cols = int(m.group(1)), int(m.group(2))
    if not (1 <= rows <= MAX_TILES and 1 <= cols <= MAX_TILES):
        raise ValueError(f"SAM tiles {rows}x{cols}: each of rows and cols must be 1..{MAX_TILES}")
    return rows, cols


def _cuts(length: int, parts: int) -> list[tuple[int, int]]:
    return [(i * length // parts, (i + 1) * length // parts) for i in range(parts)]


def encode_tiles(sam: SamModel, image: np.ndarray, tiles: tuple[int, int]) -> list[SamEncoding]:
    """SAM encodings of the image's sides rounded up to 16, split into tiles, row-major."""
    img16 = round_up_to(image, 16)
    h, w = img16.shape[:2]
    rows, cols = tiles
    if h // rows < 16 or w // cols < 16:
        raise ValueError(f"SAM tiles {rows}x{cols} are too many for a {image.shape[0]}x{image.shape[1]} image")
    return [sam.encode(np.ascontiguousarray(img16[y1:y2, x1:x2]))
            for y1, y2 in _cuts(h, rows) for x1, x2 in _cuts(w, cols)]


@torch.no_grad()
def aggregate(enc: SamEncoding, sam: SamModel, feats: torch.Tensor, mode: str = "affinity", cos_fac: float = 1.2,
              refine_neg_cos: bool = True, row_block: int | None = None) -> torch.Tensor:
    """G' = A G for features G [N, D] on the encoding's valid grid, one block of A's rows at a time."""
    if mode == "none":
        return feats.float()
    n = enc.grid[0] * enc.grid[1]
    g = feats.float().to(enc.q.device)
    row_block = row_block or (128 if g.device.type == "cpu" else 1024)  # GPUs: fewer, larger blocks
    out = torch.empty_like(g)
    unit_v = unit_values(enc) if mode in ("affinity", "cosine") else None
    for s in range(0, n, row_block):
        e = min(n, s + row_block)
        out[s:e] = affinity_rows(enc, sam, s, e, mode, cos_fac, refine_neg_cos, unit_v) @ g
    return out


@torch.no_grad()
def splice_and_aggregate(wf: WindowFeatures, clip: ClipModel, sam: SamModel | None, image: np.ndarray | None,
                         config: AggregateConfig, encodings: list[SamEncoding] | None = None,
                         on_step=None) -> FeatureMap:
    """S5 + S6 + S7: the feature map that classification compares with the text embeddings."""
    paradigm, correlation = config.paradigm, config.correlation
    if not config.uses_sam:
        projected = F.normalize(clip.project(wf.tokens), dim=-1)
        canvas = splice(WindowFeatures(projected, wf.token_grid, wf.plan, wf.patch_size, wf.image_size,
                                       wf.processed_size))
        return FeatureMap(canvas, wf.image_size, paradigm, "none", (1, 1))
    if sam is None or image is None:
        raise ValueError("splice_then_segment needs SAM and the image")
    grid_tiles = parse_tiles(config.sam_tiles, wf.image_size)
    if encodings is None:
        encodings = encode_tiles(sam, image, grid_tiles)
        if on_step:
            on_step()
    canvas = splice(wf)
    rows, cols = grid_tiles
    tiles_out = []
    for (y1, y2), (x1, x2), enc in zip([rc for rc in _cuts(canvas.shape[1], rows) for _ in range(cols)],
                                       _cuts(canvas.shape[2], cols) * rows, encodings):
        hs, ws = enc.grid
        g = F.interpolate(canvas[None, :, y1:y2, x1:x2], size=(hs, ws), mode="bilinear", align_corners=False)[0]
        g = aggregate(enc, sam, g.flatten(1).T, correlation, config.cos_fac, config.refine_neg_cos)
        tiles_out.append(F.normalize(clip.project(g), dim=-1).T.reshape(-1, hs, ws))
        if on_step:
            on_step()
    feats = _mosaic(tiles_out, rows, cols)
    whole = encodings[0] if grid_tiles == (1, 1) else None
    return FeatureMap(feats, wf.image_size, paradigm, correlation, grid_tiles, whole, tuple(encodings))



def _mosaic(tiles: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Tiles [E, h, w] (row-major) side by side; a tile whose grid differs from its row's height or its column's
    width (tiles can differ by a pixel, hence a token) is resized bilinearly to fit."""
    heights = [tiles[r * cols].shape[1] for r in range(rows)]
    widths = [tiles[c].shape[2] for c in range(cols)]

    def fit(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(t.shape[1:]) == size:
            return t
        return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]

    return torch.cat([torch.cat([fit(tiles[r * cols + c], (heights[r], widths[c])) for c in range(cols)], dim=2)
                      for r in range(rows)], dim=1)
