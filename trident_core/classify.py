"""S8: cosine of the feature map with the class texts, upsampled, softmax over queries, synonyms max-merged."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .aggregation import FeatureMap
from .classes import UNLABELED, ClassList
from .config import ClassifyConfig
from .pamr import Pamr


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Labels [H, W] (int64; `UNLABELED` where no class is confident and there is no background class),
    class probabilities [C, H, W] and the raw cosine on the feature grid [Q, h, w], at the image's size.

    Never changed once made (ComfyUI hands the same object to later runs), so tensors are shared, not copied: a
    refined segmentation holds its coarse one's tensors (labels_coarse, probs_coarse, grid_logits), and its labels
    and probs are those same tensors where SAM kept no mask. Clone a tensor before changing it in place."""

    labels: torch.Tensor
    probs: torch.Tensor
    grid_logits: torch.Tensor
    classes: ClassList
    image_size: tuple[int, int]
    labels_coarse: torch.Tensor | None = None
    probs_coarse: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def refined(self) -> bool:
        return self.labels_coarse is not None

    def logits(self) -> torch.Tensor:
        """Raw cosine logits [Q, H, W] at the image's size (bilinear, as the reference upsamples them)."""
        return upsample(self.grid_logits, self.image_size)


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of [C, h, w] to `size`."""
    return F.interpolate(grid[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def grid_logits(fm: FeatureMap, text: torch.Tensor) -> torch.Tensor:
    """Cosine [Q, h, w] of the feature map's tokens with the (normalised) text embeddings."""
    return torch.einsum("qe,ehw->qhw", text.float().to(fm.features.device), fm.features.float())


def class_probs(logits: torch.Tensor, classes: ClassList, logit_scale: float,
                overwrite: bool = False) -> torch.Tensor:
    """Softmax over all queries of `logit_scale * logits`, then each class's max over its queries, [C, ...].

    `overwrite`: the logits are the caller's temporary, and on the CPU they are scaled and turned into
    probabilities in their own memory (the same operations, so the same values bit for bit): at 1024x1024 with 40
    queries this saves two 168 MB copies at the peak."""
    if overwrite and logits.device.type == "cpu":
        p = torch.softmax(logits.mul_(logit_scale), dim=0, out=logits)
    else:
        p = (logits * logit_scale).softmax(dim=0)
    if len(classes.queries) == len(classes):
        return p
    out = p.new_empty((len(classes), *p.shape[1:]))
    start = 0
    for i, cls in enumerate(classes.classes):
        torch.amax(p[start:start + len(cls)], dim=0, out=out[i])  # (no list of maxima stacked afterwards)
        start += len(cls)
    return out


# ids of the probabilities `classify` made from its grid logits alone -> (those logits, classes, size, logit scale)
_PLAIN: dict[int, tuple] = {}


def _mark_plain(seg: Segmentation, logit_scale: float) -> None:
    _PLAIN[id(seg.probs)] = (weakref.ref(seg.grid_logits), seg.classes, tuple(seg.image_size), logit_scale)
    weakref.finalize(seg.probs, _PLAIN.pop, id(seg.probs), None)


def plain_probs(seg: Segmentation, logit_scale: float) -> bool:
    """Whether `seg`'s probabilities are the very tensor `classify` made from `seg`'s own grid logits, classes and
    size at `logit_scale` (no PAMR), so that recomputing them from the logits gives them bit for bit (tensors are
    never changed once made)."""
    made = _PLAIN.get(id(seg.probs))
    return made is not None and made[0]() is seg.grid_logits and made[1:] == (
        seg.classes, tuple(seg.image_size), logit_scale)


def labels_from_probs(probs: torch.Tensor, classes: ClassList, prob_thd: float) -> torch.Tensor:
    """Argmax class; under `prob_thd` the background (0) or `UNLABELED` when the list has no background."""
    best, labels = probs.max(dim=0)
    return labels.masked_fill_(best < prob_thd, UNLABELED if not classes.has_background else 0)  # (its own memory)


def check_embeddings(fm: FeatureMap, text: torch.Tensor, classes: ClassList, text_made_by: str = "") -> None:
    """Refuse text embeddings that do not fit: one per query, of the feature map's size, from the same CLIP (where
    both say which: `text_made_by` and the feature map's `made_by`)."""
    if text_made_by and fm.made_by and text_made_by != fm.made_by:
        raise ValueError(f"the classes were encoded by CLIP {text_made_by}, the feature map was made with CLIP "
                         f"{fm.made_by}: use the same CLIP (one Trident Load CLIP) for both")
    if text.shape[0] != len(classes.queries):
        raise ValueError(f"{text.shape[0]} text embeddings for {len(classes.queries)} class names")
    if text.shape[1] != fm.features.shape[0]:
        raise ValueError(f"the classes were encoded by a CLIP with {text.shape[1]}-d embeddings, the feature map has "
                         f"{fm.features.shape[0]}: use the same CLIP for both")


@torch.no_grad()
def classify(fm: FeatureMap, text: torch.Tensor, classes: ClassList, config: ClassifyConfig,
             pamr: Pamr | None = None, text_made_by: str = "") -> Segmentation:
    """Labels and probabilities at the image's size from a feature map and the query embeddings (made by the CLIP
    `text_made_by`, where known: `check_embeddings`); with `pamr` (built from `config`'s PAMR settings), the
    upsampled logits are refined by PAMR before the softmax (as the reference)."""
    check_embeddings(fm, text, classes, text_made_by)
    g = grid_logits(fm, text)
    if not bool(torch.isfinite(g).all()):  # (never NaN probabilities, all-unlabelled maps or NaN confidences)
        raise ValueError("the image features or class embeddings hold NaN/Inf values: a model file is damaged "
                         "(download it again), or half precision overflowed (use precision fp32 or bf16)")
    logits = upsample(g, fm.image_size)
    if pamr is not None and pamr.steps:
        logits = pamr(logits)
    probs = class_probs(logits, classes, config.logit_scale, overwrite=True)
    del logits  # (the probabilities were computed in its memory, or from it)
    labels = labels_from_probs(probs, classes, config.prob_thd)
    seg = Segmentation(labels, probs, g, classes, fm.image_size,
                       info={"image_digest": fm.image_digest} if fm.image_digest else {})
    if pamr is None or not pamr.steps:
        _mark_plain(seg, config.logit_scale)
    return seg
