"""S7 (after S5's splice): aggregate with SAM's affinity per SAM tile, project to CLIP's embedding space.

Each SAM tile (sam_tiles.py; 1x2 is the reference's Cityscapes mode) is encoded on its own, so the affinity is
block-diagonal and only its diagonal blocks are ever computed. `segment_then_splice` is the
ProxyCLIP baseline: each window is projected and normalised on its own and the windows are averaged, no SAM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import AggregateConfig
from .models import ClipModel, SamEncoding, SamModel
from .sam_affinity import affinity_rows, unit_values
from .sam_tiles import SamTileEncodings
from .window_features import WindowFeatures, splice


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """Per-token image features in CLIP's embedding space, [E, h, w], for an image of `image_size` (H, W), how
    they were aggregated (`tiles`: the SAM tiling's rows x cols) and the CLIP that made them (`ClipModel.identity`)."""

    features: torch.Tensor
    image_size: tuple[int, int]
    paradigm: str
    correlation: str
    tiles: tuple[int, int]
    made_by: str = ""
    image_digest: str = ""  # of the image (`image.image_digest`), where the window features had it
    scale: tuple[int, int] = (0, 0)  # the window features' first resize (short_side, long_cap): PAMR's guide scale


@torch.no_grad()
def aggregate(enc: SamEncoding, sam: SamModel, feats: torch.Tensor, config: AggregateConfig,
              row_block: int | None = None) -> torch.Tensor:
    """G' = A G for features G [N, D] on the encoding's valid grid (A by `config`'s correlation), one block of A's
    rows at a time."""
    mode = config.correlation
    if mode == "none":
        return feats.float()
    n = enc.grid[0] * enc.grid[1]
    g = feats.float().to(enc.q.device)
    # GPUs: fewer, larger blocks, all heads at once ([heads, 512, N] float32: 100 MB per product at 64x64)
    row_block = row_block or (128 if g.device.type == "cpu" else 512)
    out = torch.empty_like(g)
    unit_v = unit_values(enc) if mode in ("affinity", "cosine") else None
    for s in range(0, n, row_block):
        e = min(n, s + row_block)
        out[s:e] = affinity_rows(enc, sam, s, e, config, unit_v) @ g
    return out


@torch.no_grad()
def splice_and_aggregate(wf: WindowFeatures, clip: ClipModel, sam: SamModel | None,
                         encodings: SamTileEncodings | None, config: AggregateConfig, on_step=None,
                         check: bool = True) -> FeatureMap:
    """S5 + S7: the feature map that classification compares with the text embeddings, aggregated with SAM's
    affinity over the image's SAM tile `encodings` (splice_then_segment; segment_then_splice needs none).
    `check`: CLIP's projections refused where not finite (`ClipModel.project`; classification checks its
    logits)."""
    paradigm, correlation = config.paradigm, config.correlation
    if not config.uses_sam:
        projected = F.normalize(clip.project(wf.tokens), dim=-1)
        canvas = splice(WindowFeatures(projected, wf.token_grid, wf.plan, wf.patch_size, wf.image_size,
                                       wf.processed_size))
        return FeatureMap(canvas, wf.image_size, paradigm, "none", (1, 1), clip.identity, wf.image_digest, wf.scale)
    if sam is None or encodings is None:
        raise ValueError("splice_then_segment needs SAM and its encoding of the image")
    encodings.check(sam, wf.image_size, "SAM encoding")
    if wf.image_digest and encodings.image_digest and wf.image_digest != encodings.image_digest:
        raise ValueError("the window features and SAM's encoding were made from two different images of the same "
                         "size: connect the same image to Window Features and Splice & Aggregate")
    canvas = splice(wf)
    tiling = encodings.tiling
    tiles_out = []
    for (y1, y2, x1, x2), enc in zip(tiling.boxes(tuple(canvas.shape[1:])), encodings.encodings):
        hs, ws = enc.grid
        g = F.interpolate(canvas[None, :, y1:y2, x1:x2], size=(hs, ws), mode="bilinear", align_corners=False)[0]
        g = aggregate(enc, sam, g.flatten(1).T, config)
        tiles_out.append(F.normalize(clip.project(g, check), dim=-1).T.reshape(-1, hs, ws))
        if on_step:
            on_step()
    feats = _mosaic(tiles_out, *tiling.shape)
    return FeatureMap(feats, wf.image_size, paradigm, correlation, tiling.shape, clip.identity, wf.image_digest,
                      wf.scale)


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
