"""S9: SAM refinement of the coarse segmentation, as the reference does it.

At half resolution, each confident class's 8-connected regions (at least `minimal_area` pixels) become SAM
prompts: the region's best point and tight box, plus one mask prompt per class built from the class's
probability map. Masks whose predicted IoU passes `iou_thresh` replace the coarse labels where they lie.

Mask-prompt modes: "reference" passes the mask prompt as [1, 256, 256], as the reference does; SAM then
normalises the downscaled mask over the height axis instead of the channels and broadcasts one dense embedding to
every region (its effect is far from negligible). "batched" is the corrected [1, 1, 256, 256] call."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .classify import Segmentation
from .config import RefineConfig
from .image import require_same_image, require_size, round_up_to
from .models import SamEncoding, SamModel


def _chunk(device: torch.device) -> int:
    """Regions per mask-decoder call / masks per post-processing step: few on the CPU (memory), many on GPUs."""
    return 4 if device.type == "cpu" else 32


def _half(prob: torch.Tensor, half: tuple[int, int]) -> torch.Tensor:
    """One class's probability [H, W] at half resolution (bilinear): channel by channel, the values of the whole
    [C, H, W] interpolation without its [C, H/2, W/2] copy."""
    return F.interpolate(prob[None, None], half, mode="bilinear", align_corners=False)[0, 0]


@dataclass
class _Region:
    mask: np.ndarray  # half-res bool
    point: tuple[int, int]  # (x, y)
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 inclusive


def _regions(member: np.ndarray, prob: np.ndarray, minimal_area: int) -> list[_Region]:
    """8-connected regions of a class's half-res label mask with their best point and tight box."""
    n, comp = cv2.connectedComponents(member.astype(np.uint8), connectivity=8)
    out = []
    for lab in range(1, n):
        mask = comp == lab
        if mask.sum() < minimal_area:
            continue
        flat = int(np.argmax(np.where(mask, prob, 0).reshape(-1)))
        ys, xs = np.nonzero(mask)
        out.append(_Region(mask, (flat % prob.shape[1], flat // prob.shape[1]),
                           (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
    return out


def _mask_prompt(prob_down: torch.Tensor, image_size: tuple[int, int], p: RefineConfig) -> torch.Tensor:
    """The class's probability at SAM's 256 mask-prompt scale: alpha * p where p > coarse_thresh, else 0."""
    nh, nw = SamModel.mask_prompt_size(image_size)
    r = F.interpolate(prob_down[None, None], [nh, nw], mode="bilinear", align_corners=False)[0]
    r = F.pad(r, (0, 256 - nw, 0, 256 - nh), mode="constant", value=0)
    r = torch.where(r > p.coarse_thresh, p.mask_alpha * r, torch.zeros(()))
    return r if p.mask_prompt_mode == "reference" else r[None]


@torch.no_grad()
def _decode(sam: SamModel, embedding: torch.Tensor, regions: list[_Region], half: tuple[int, int],
            mask_prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A class's regions through the mask decoder: low-res mask logits [n, 1, 256, 256] and IoUs [n].

    The reference makes one call per class; the decoder treats each prompt on its own, so calls of a few
    regions give the same masks with less memory."""
    chunk = _chunk(sam.device)
    outs = [sam.decode(embedding, [r.point for r in regions[i:i + chunk]], [r.box for r in regions[i:i + chunk]],
                       half, mask_prompt) for i in range(0, len(regions), chunk)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _class_score(sam: SamModel, enc: SamEncoding, low: torch.Tensor, prob: torch.Tensor,
                 size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over a class's kept masks of sigmoid(logit) * p, and the union of the masks, at full resolution.

    Mask logits follow the reference's path: 256 -> 1024 -> crop -> SAM's original size -> the image size. A few
    masks at a time, so memory does not grow with the number of regions."""
    chunk = _chunk(prob.device)
    score = torch.zeros(size, device=prob.device)
    union = torch.zeros(size, dtype=torch.bool, device=prob.device)
    for i in range(0, low.shape[0], chunk):
        logits = sam.upscale_masks(low[i:i + chunk], enc)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size, mode="bilinear", align_corners=False)
        logits = logits[:, 0].to(prob.device)
        score = torch.maximum(score, (logits.sigmoid() * prob).max(dim=0).values)
        union |= (logits > sam.mask_threshold).any(dim=0)
    return score, union


@torch.no_grad()
def refine(seg: Segmentation, sam: SamModel, image: np.ndarray, params: RefineConfig,
           encoding: SamEncoding | None = None, on_class=None) -> Segmentation:
    """Refined labels (and score map) of a coarse segmentation; the image is the original RGB uint8 array.
    `encoding` is SAM's encoding of the whole image (its sides rounded up to 16) when one was made for the
    aggregation (1x1 tiles); without it, SAM encodes the image here."""
    require_size(image, seg.image_size, "segmentation")
    require_same_image(image, seg.info.get("image_digest", ""), "segmentation")
    img16 = round_up_to(image, 16)
    if encoding is None:
        encoding = sam.encode(img16)
    else:
        sam.check_encoding(encoding, "SAM encoding")
        if tuple(encoding.original_size) != img16.shape[:2]:
            raise ValueError(f"the SAM encoding is of a {encoding.original_size[1]}x{encoding.original_size[0]} "
                             f"image, not of this {image.shape[1]}x{image.shape[0]} one: connect the encoding of the "
                             "image that was segmented")
        require_same_image(img16, encoding.image_digest, "SAM encoding")
    enc = encoding
    h, w = seg.image_size
    c = len(seg.classes)
    half = (h // 2, w // 2)
    if min(half) < 1:
        return seg
    labels, probs = seg.labels, seg.probs.float()
    lab_down = F.interpolate(labels[None, None].float(), half, mode="nearest")[0, 0].long()
    if params.coarse_thresh > 0:
        top = _half(probs[0], half)
        for k in range(1, c):
            torch.maximum(top, _half(probs[k], half), out=top)
        lab_down[top < params.coarse_thresh] = c
        del top
    lab_np = lab_down.cpu().numpy()
    refined = None  # the refined maps [C, H, W], made when the first class keeps a mask
    embedding = None  # SAM's image embedding, finished from the encoding when the first class needs it
    failed = np.zeros(half, dtype=bool)
    kept_total = rejected_total = 0
    for k in range(c):
        if on_class:
            on_class()
        prob_down = _half(probs[k], half)
        prob_np = prob_down.cpu().numpy()
        if prob_np.max() < params.coarse_thresh:
            continue
        regions = _regions(lab_np == k, prob_np, params.minimal_area)
        if not regions:
            continue
        if embedding is None:
            embedding = sam.image_embedding(enc)
        low, iou = _decode(sam, embedding, regions, half, _mask_prompt(prob_down, (h, w), params))
        keep = (iou > params.iou_thresh).cpu()
        for r, ok in zip(regions, keep.tolist()):
            if not ok:
                failed |= r.mask
        if not keep.any():
            rejected_total += len(regions)
            continue
        kept_total += int(keep.sum())
        rejected_total += int((~keep).sum())
        score, union = _class_score(sam, enc, low[keep.to(low.device)], probs[k], (h, w))
        if refined is None:
            refined = torch.zeros_like(probs)
        refined[k] = score * union
    info = {"regions_kept": kept_total, "regions_rejected": rejected_total}
    if refined is None:  # the coarse maps stand (the same tensors: values are never changed once returned)
        return Segmentation(labels, probs, seg.grid_logits, seg.classes, seg.image_size, labels, probs,
                            {**seg.info, **info})
    covered = refined.sum(dim=0) != 0
    new_labels = torch.where(covered, refined.argmax(dim=0), labels)
    area = None
    if failed.any():
        area = F.interpolate(torch.from_numpy(failed)[None, None].float(), (h, w), mode="nearest")[0, 0]
    scores = final_scores(refined, probs, None if area is None else area.to(probs.device))
    return Segmentation(new_labels, scores, seg.grid_logits, seg.classes, seg.image_size, labels, probs,
                        {**seg.info, **info})


def final_scores(refined: torch.Tensor, probs: torch.Tensor, failed: torch.Tensor | None) -> torch.Tensor:
    """The reference's last two steps, `refined = max(refined, failed * probs)` (where regions failed, [H, W]) and
    `where(refined.sum(0) != 0, refined, probs)`, computed class by class in `refined`'s own memory: the same
    elementwise values without [C, H, W] temporaries (59 classes at 1024x1024: 247 MB each). Returns `refined`."""
    if failed is not None:
        for k in range(refined.shape[0]):
            torch.maximum(refined[k], failed * probs[k], out=refined[k])
    some = refined.sum(dim=0) != 0
    for k in range(refined.shape[0]):
        torch.where(some, refined[k], probs[k], out=refined[k])
    return refined
