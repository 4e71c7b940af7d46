"""A segmentation as a batch of frames keeps it: small per frame, so memory does not grow with the frames.

The labels are kept in the smallest integer type that holds them. The class probabilities of `classify` are
softmax(logit_scale x bilinear-upsampled grid logits), so they are recomputed on demand from the low-resolution
logits, bit for bit, whenever the stored map equals that recomputation (checked when compacting); other maps (the
refined scores) are kept in float16. No SAM encoding is part of a segmentation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .classes import ClassList
from .classify import class_probs, labels_from_probs, plain_probs, upsample


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest signed integer type holding labels -1 .. num_classes - 1."""
    if num_classes <= torch.iinfo(torch.int8).max:
        return torch.int8
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


@dataclass(frozen=True, eq=False)
class CompactSegmentation:
    """The attributes of a `Segmentation` (labels, probs, grid_logits, classes, image_size, labels_coarse,
    probs_coarse, info, refined, logits()), stored compactly; probabilities are rebuilt per access.

    `stored_probs` / `stored_probs_coarse` are None where the map is the logits' softmax (recomputed exactly),
    else float16; `stored_labels_coarse` is None where the coarse labels follow from the logits' softmax."""

    labels: torch.Tensor
    grid_logits: torch.Tensor
    classes: ClassList
    image_size: tuple[int, int]
    logit_scale: float
    prob_thd: float
    refined: bool = False
    stored_probs: torch.Tensor | None = None
    stored_probs_coarse: torch.Tensor | None = None
    stored_labels_coarse: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def logits(self) -> torch.Tensor:
        """Raw cosine logits [Q, H, W] at the image's size."""
        return upsample(self.grid_logits, self.image_size)

    def logit_probs(self) -> torch.Tensor:
        """softmax(logit_scale x upsampled logits), synonyms max-merged [C, H, W]: classify's probabilities."""
        return class_probs(self.logits(), self.classes, self.logit_scale, overwrite=True)

    @property
    def probs(self) -> torch.Tensor:
        """Class probabilities [C, H, W] (float32): after refinement, the refined scores."""
        return self.logit_probs() if self.stored_probs is None else self.stored_probs.float()

    @property
    def probs_coarse(self) -> torch.Tensor | None:
        """The probabilities before refinement, or None when the segmentation was not refined."""
        if not self.refined:
            return None
        return self.logit_probs() if self.stored_probs_coarse is None else self.stored_probs_coarse.float()

    @property
    def labels_coarse(self) -> torch.Tensor | None:
        """The labels before refinement, or None when the segmentation was not refined."""
        if not self.refined:
            return None
        if self.stored_labels_coarse is not None:
            return self.stored_labels_coarse
        # not stored: they equal the labels of the logits' own probabilities (checked when compacting), never the
        # float16 copy of a refined map, whose rounding can tie two classes or cross the threshold
        return labels_from_probs(self.logit_probs(), self.classes, self.prob_thd).to(self.labels.dtype)


@torch.no_grad()
def compact(seg: object, logit_scale: float, prob_thd: float) -> CompactSegmentation:
    """`seg` (a Segmentation or CompactSegmentation, classified with `logit_scale` and `prob_thd`) made compact.

    Maps equal to the recomputation from the logits are not stored."""
    if isinstance(seg, CompactSegmentation):
        return seg
    dtype = label_dtype(len(seg.classes))
    made: list[torch.Tensor] = []

    def base() -> torch.Tensor:
        """The probabilities recomputed from the logits, made once when first asked for."""
        if not made:
            made.append(class_probs(upsample(seg.grid_logits, seg.image_size), seg.classes, logit_scale,
                                    overwrite=True))
        return made[0]

    def stored(probs: torch.Tensor | None) -> torch.Tensor | None:
        # (classify's own probabilities are the recomputation: not recomputed and compared, which on a GPU
        # waited for its queue each frame)
        if probs is None or (probs is seg.probs and plain_probs(seg, logit_scale)) or torch.equal(
                probs.float(), base()):
            return None
        return probs.half()

    coarse_labels = None
    if seg.refined:
        recomputed = labels_from_probs(base(), seg.classes, prob_thd)
        if not torch.equal(seg.labels_coarse.long(), recomputed):
            coarse_labels = seg.labels_coarse.to(dtype)
    return CompactSegmentation(
        seg.labels.to(dtype), seg.grid_logits, seg.classes, tuple(seg.image_size), float(logit_scale),
        float(prob_thd), bool(seg.refined), stored(seg.probs), stored(seg.probs_coarse) if seg.refined else None,
        coarse_labels, dict(seg.info))
