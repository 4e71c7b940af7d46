"""Pictures of the method's intermediate results: a feature map's principal components as colours, one class's
probability as a heat map, and the SAM affinity row of one pixel (the paper's Figure 3), all at the image's size.

Used by the ComfyUI inspect nodes; pure torch/numpy/OpenCV."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .aggregation import FeatureMap, _cuts, encode_tiles
from .classes import ClassListError, class_indices
from .classify import Segmentation
from .config import CORRELATIONS, check_mode
from .image import require_size
from .models import SamEncoding, SamModel
from .sam_affinity import affinity_rows

POINT_UNITS = ("fraction", "pixels")


def pca_rgb(features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The first three principal components of the tokens of a feature map [E, h, w] as RGB [H, W, 3] in 0..1.

    Each component is stretched between its 1st and 99th percentile; its sign is fixed so that the largest loading
    is positive (the same features always give the same picture). Tokens are shown as blocks (nearest)."""
    e, h, w = features.shape
    x = features.detach().float().reshape(e, h * w).T
    x = x - x.mean(dim=0, keepdim=True)
    cov = x.T @ x / max(1, x.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    comps = vecs[:, -3:].flip(-1)
    if comps.shape[1] < 3:
        comps = F.pad(comps, (0, 3 - comps.shape[1]))
    signs = torch.sign(comps.gather(0, comps.abs().argmax(dim=0, keepdim=True)))
    proj = x @ (comps * torch.where(signs == 0, torch.ones_like(signs), signs))  # [N, 3]
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1).T.reshape(3, h, w)
    if size is not None and tuple(size) != (h, w):
        rgb = F.interpolate(rgb[None], size=tuple(size), mode="nearest")[0]
    return rgb.permute(1, 2, 0).contiguous()


def heat_rgb(values: torch.Tensor) -> torch.Tensor:
    """A map of values in 0..1 [H, W] as an RGB heat map [H, W, 3] in 0..1 (OpenCV's inferno: 0 black, 1 yellow)."""
    v = np.rint(values.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(v, cv2.COLORMAP_INFERNO)
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).float() / 255.0


def class_probability(seg: Segmentation, name: str, coarse: bool = False) -> torch.Tensor:
    """The probability map [H, W] of the class called `name` (any synonym); `coarse` takes the map from before
    SAM refinement (the same map when the segmentation was not refined)."""
    idx = class_indices(seg.classes, name)
    if not name.strip() or len(idx) != 1:
        raise ClassListError(f"name exactly one class, one of: {', '.join(seg.classes.names)}")
    probs = seg.probs_coarse if coarse and seg.probs_coarse is not None else seg.probs
    return probs[idx[0]].float()


def point_to_pixels(x: float, y: float, units: str, size: tuple[int, int]) -> tuple[int, int]:
    """(x, y) as fractions of the width/height or as pixels, to a pixel (column, row) inside an image of `size`."""
    if units not in POINT_UNITS:
        raise ValueError(f"units must be one of {POINT_UNITS}, not {units!r}")
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"the point (x={x}, y={y}) is not a finite number: give x and y as fractions from 0 to 1 "
                         "of the width and height, or as pixels")
    h, w = size
    if units == "fraction":
        x, y = x * w, y * h
    return min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)


def feature_map_encodings(fm: FeatureMap, sam: SamModel,
                          image: np.ndarray | None) -> tuple[list[SamEncoding], tuple[int, int]]:
    """The feature map's SAM tile encodings and tiling; for a map that has none (segment_then_splice), SAM's
    encoding (one tile) of the segmented image."""
    if fm.sam_tile_encodings:
        return list(fm.sam_tile_encodings), fm.tiles
    if image is None:
        raise ValueError("this feature map has no SAM encoding (segment_then_splice): connect the image it was made "
                         "from to 'image'")
    require_size(image, fm.image_size, "feature map")
    return encode_tiles(sam, image, (1, 1)), (1, 1)


@torch.no_grad()
def point_affinity(encodings: list[SamEncoding], tiles: tuple[int, int], sam: SamModel, image_size: tuple[int, int],
                   point: tuple[int, int], mode: str = "affinity", cos_fac: float = 1.2,
                   refine_neg_cos: bool = True) -> torch.Tensor:
    """The correlation row (S6) of the SAM token under pixel `point` (x, y), as a map [H, W] scaled to max 1.

    `encodings` are the SAM tile encodings of the image (row-major, as `aggregation.encode_tiles` makes them);
    the affinity is block-diagonal over tiles, so pixels of other tiles are 0."""
    check_mode("correlation", mode, CORRELATIONS)
    rows, cols = tiles
    if len(encodings) != rows * cols:
        raise ValueError(f"{len(encodings)} SAM encodings for {rows}x{cols} tiles")
    h, w = image_size
    h16, w16 = -(-h // 16) * 16, -(-w // 16) * 16  # the SAM branch's image, sides rounded up to 16
    px, py = (point[0] + 0.5) * w16 / w, (point[1] + 0.5) * h16 / h
    ycuts, xcuts = _cuts(h16, rows), _cuts(w16, cols)
    r = next(i for i, (a, b) in enumerate(ycuts) if a <= py < b or i == rows - 1)
    c = next(i for i, (a, b) in enumerate(xcuts) if a <= px < b or i == cols - 1)
    (y1, y2), (x1, x2) = ycuts[r], xcuts[c]
    chosen = encodings[r * cols + c]
    sam.check_encoding(chosen, "feature map's SAM encoding")
    if tuple(chosen.original_size) != (y2 - y1, x2 - x1):
        raise ValueError(f"the SAM encoding is of a {chosen.original_size[1]}x{chosen.original_size[0]} image, not "
                         f"of the {w}x{h} image the feature map was made from: connect the image that was segmented")
    enc = chosen.to(sam.device)
    hs, ws = enc.grid
    ty = min(hs - 1, int((py - y1) / (y2 - y1) * enc.input_size[0] / 16))
    tx = min(ws - 1, int((px - x1) / (x2 - x1) * enc.input_size[1] / 16))
    row = affinity_rows(enc, sam, ty * ws + tx, ty * ws + tx + 1, mode, cos_fac, refine_neg_cos)[0]
    tile = F.interpolate(row.float().reshape(1, 1, hs, ws).cpu(), size=(y2 - y1, x2 - x1), mode="bilinear",
                         align_corners=False)[0, 0]
    canvas = torch.zeros(h16, w16)
    canvas[y1:y2, x1:x2] = tile.clamp_min(0)
    if (h16, w16) != (h, w):
        canvas = F.interpolate(canvas[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return canvas / canvas.max().clamp_min(torch.finfo(canvas.dtype).tiny)


def mark_point(rgb: torch.Tensor, point: tuple[int, int], color: tuple[float, float, float] = (0.0, 1.0, 1.0),
               radius: int | None = None) -> torch.Tensor:
    """A copy of an RGB image [H, W, 3] (0..1) with a ring drawn around pixel `point` (x, y)."""
    img = np.array(rgb.detach().float().cpu().numpy(), order="C", copy=True)
    h, w = img.shape[:2]
    rad = radius or max(3, min(h, w) // 60)
    cv2.circle(img, (int(point[0]), int(point[1])), rad, tuple(float(v) for v in color), max(1, rad // 3),
               cv2.LINE_AA)
    return torch.from_numpy(img)
