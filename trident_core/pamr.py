"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as the reference applies it to the logits.

Each step replaces every pixel's logits by a weighted sum of its 8 neighbours' at each dilation (replicate
padding at the borders). The weights come from the guide image: for neighbour p, the channel-mean of
-|I(x) - I(x+p)| / (1e-8 + 0.1 std), std being the (unbiased) spread of the 3x3 neighbourhoods at all dilations,
then a softmax over the neighbours. Classes are processed in blocks so memory stays bounded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .image import normalize_clip, rescale_short_side

# (dy, dx) in raster order around the centre; the centre itself is only part of the spread.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
WINDOW = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))
DEFAULT_DILATIONS = (8, 16)
MAX_STEPS = 100
MAX_DILATION, MAX_DILATIONS = 256, 8  # pixels; how many (the reference's: 8 and 16)
BLOCK_BYTES = 256 << 20


def check_pamr(steps: int, dilations: Sequence[int]) -> None:
    """Refuse steps outside 0..MAX_STEPS and dilations that are not positive integers."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"pamr_steps must be an integer from 0 (off) to {MAX_STEPS}, got {steps!r}")
    if not dilations or len(dilations) > MAX_DILATIONS or any(
            not isinstance(d, (int, np.integer)) or isinstance(d, bool) or not 1 <= d <= MAX_DILATION
            for d in dilations):
        raise ValueError(f"pamr_dilations must be 1 to {MAX_DILATIONS} whole numbers from 1 to {MAX_DILATION} "
                         f"such as 8,16, got {tuple(dilations)!r}")


def parse_dilations(text: str) -> tuple[int, ...]:
    """"8,16" -> (8, 16), with a clear error for anything else."""
    try:
        dilations = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        dilations = ()
    if not dilations or len(dilations) > MAX_DILATIONS or not all(1 <= d <= MAX_DILATION for d in dilations):
        raise ValueError(f"PAMR dilations must be 1 to {MAX_DILATIONS} whole numbers from 1 to {MAX_DILATION} "
                         f"separated by commas, e.g. 8,16; got {text!r}")
    return dilations


def _shifts(x: torch.Tensor, d: int, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[N, H, W] -> [N, len(offsets), H, W]: the value at (y + dy d, x + dx d), borders replicated."""
    h, w = x.shape[-2:]
    padded = F.pad(x[:, None], (d, d, d, d), mode="replicate")[:, 0]
    return torch.stack([padded[:, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w] for dy, dx in offsets],
                       dim=1)


def neighbour_weights(guide: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Softmax weights [P, H, W] (P = 8 per dilation) of a guide image [K, H, W]."""
    guide = guide.float()
    spread = torch.cat([_shifts(guide, d, WINDOW) for d in dilations], dim=1).std(dim=1, keepdim=True)
    contrast = torch.cat([(guide[:, None] - _shifts(guide, d, NEIGHBOURS)).abs() for d in dilations], dim=1)
    return (-contrast / (1e-8 + 0.1 * spread)).mean(dim=0).softmax(dim=0)


def propagate(logits: torch.Tensor, weights: torch.Tensor, dilations: Sequence[int], steps: int) -> torch.Tensor:
    """`steps` rounds of the weighted neighbour sum on logits [C, H, W], a block of classes at a time."""
    c, h, w = logits.shape
    p = weights.shape[0]
    block = max(1, BLOCK_BYTES // (4 * p * h * w * 2))
    out = []
    for i in range(0, c, block):
        m = logits[i:i + block].float()
        for _ in range(steps):
            m = (torch.cat([_shifts(m, d, NEIGHBOURS) for d in dilations], dim=1) * weights).sum(dim=1)
        out.append(m)
    return torch.cat(out)


def pamr_guide(image: np.ndarray, short_side: int, long_cap: int = 2048) -> torch.Tensor:
    """The reference's guide image [3, H, W]: the CLIP-normalised rescaled image (what its data preprocessor
    yields) resized bilinearly back to the image's size."""
    x = normalize_clip(rescale_short_side(image, short_side, long_cap))
    return F.interpolate(x, size=image.shape[:2], mode="bilinear", align_corners=False)[0]


@dataclass(frozen=True)
class Pamr:
    """PAMR for one image: `steps` rounds at `dilations`, guided by `guide` [3, H, W]."""

    steps: int
    dilations: tuple[int, ...]
    guide: torch.Tensor

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Refined logits [C, H, W] (a new tensor; the input is not changed)."""
        check_pamr(self.steps, self.dilations)
        if tuple(logits.shape[-2:]) != tuple(self.guide.shape[-2:]):
            raise ValueError(f"PAMR: logits of size {tuple(logits.shape[-2:])} for a guide image of size "
                             f"{tuple(self.guide.shape[-2:])}")
        weights = neighbour_weights(self.guide.to(logits.device), self.dilations)
        return propagate(logits, weights, self.dilations, self.steps)
