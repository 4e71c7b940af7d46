"""Pictures of the method's intermediate results: a feature map's principal components as colours, one class's
probability as a heat map, and the SAM affinity row of one pixel (the paper's Figure 3), all at the image's size.

Used by the ComfyUI inspect nodes; pure torch/numpy/OpenCV."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .classes import ClassListError, class_indices
from .classify import Segmentation
from .config import AggregateConfig
from .image import require_same_image, require_size
from .models import SamModel
from .sam_affinity import affinity_rows
from .sam_tiles import SamTileEncodings, SamTiling, encode_tiles

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
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise ValueError(f"the point (x={x:g}, y={y:g}) is not a fraction of the width and height (0 to 1): "
                             "set units to 'pixels' to give pixel positions")
        x, y = x * w, y * h
    elif not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"the point (x={x:g}, y={y:g}) is outside the {w}x{h} image: give x from 0 to {w - 1} and y "
                         f"from 0 to {h - 1}, or set units to 'fraction'")
    return min(int(x), w - 1), min(int(y), h - 1)


def inspection_encodings(encodings: SamTileEncodings | None, sam: SamModel, image: np.ndarray | None,
                         image_size: tuple[int, int], digest: str = "") -> SamTileEncodings:
    """The image's SAM tile encodings as Splice & Aggregate made them; without them (not connected, or a
    segment_then_splice feature map), SAM's encoding (one tile) of the segmented image. `digest`: the feature
    map's `image_digest` (empty where unknown): encodings or an image of another picture are refused."""
    if encodings is not None:
        if digest and encodings.image_digest and encodings.image_digest != digest:
            raise ValueError("the SAM encoding is of another image than the feature map's: connect both outputs of "
                             "the same Splice & Aggregate")
        return encodings
    if image is None:
        raise ValueError("no SAM encoding to explain: connect the image that was segmented to 'image', or Splice & "
                         "Aggregate's sam_encoding output to 'sam_encoding'")
    require_size(image, image_size, "feature map")
    require_same_image(image, digest, "feature map")
    return encode_tiles(sam, image, SamTiling(1, 1, tuple(image_size)))


@torch.no_grad()
def point_affinity(encodings: SamTileEncodings, sam: SamModel, image_size: tuple[int, int], point: tuple[int, int],
                   mode: str = "affinity", cos_fac: float = 1.2, refine_neg_cos: bool = True) -> torch.Tensor:
    """The correlation row (S6) of the SAM token under pixel `point` (x, y) of an image of `image_size`, as a map
    [H, W] scaled to max 1. The affinity is block-diagonal over SAM tiles, so pixels of other tiles are 0."""
    config = AggregateConfig(correlation=mode, cos_fac=cos_fac, refine_neg_cos=refine_neg_cos)  # checks them
    encodings.check(sam, image_size, "SAM encoding")
    tiling = encodings.tiling
    i, fy, fx = tiling.locate(*point)
    y1, y2, x1, x2 = tiling.boxes()[i]
    enc = encodings.encodings[i].to(sam.device)
    hs, ws = enc.grid
    ty = min(hs - 1, int(fy * enc.input_size[0] / 16))
    tx = min(ws - 1, int(fx * enc.input_size[1] / 16))
    row = affinity_rows(enc, sam, ty * ws + tx, ty * ws + tx + 1, config)[0]
    tile = F.interpolate(row.float().reshape(1, 1, hs, ws).cpu(), size=(y2 - y1, x2 - x1), mode="bilinear",
                         align_corners=False)[0, 0]
    canvas = torch.zeros(tiling.padded_size)
    canvas[y1:y2, x1:x2] = tile.clamp_min(0)
    if tiling.padded_size != tuple(image_size):
        canvas = F.interpolate(canvas[None, None], size=tuple(image_size), mode="bilinear",
                               align_corners=False)[0, 0]
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
