"""Label maps that hold still over a video: each frame's class probabilities blended with the previous frames'
carried along the optical flow, and the flicker measure of a clip's labels.

p'_k = (1 - s) p_k + s warp(p'_{k-1}) on the pixels visible in both frames (flow.py's forward-backward check, in
view); occluded, disoccluded and newly entered pixels take p_k alone, and frame 0 is left as it is. Labels are
then derived from p' as classify derives them (argmax, `prob_thd` to the background or unlabeled). The trade:
a class that truly changes at a pixel (something moves in, a fast change the flow misses) reaches its label a
few frames late, the more so the larger s (a change needs about log(1/2) / log(s) frames to win a tie, so 1 at
s = 0.5, 3 at s = 0.8); strength 0 returns every segmentation untouched."""

from __future__ import annotations

import numpy as np
import torch

from .classify import Segmentation, labels_from_probs
from .flow import Flow, FlowStream, warp_labels, warp_maps

MAX_STRENGTH = 0.95


def check_strength(strength: float) -> float:
    """`strength` as a float in 0..MAX_STRENGTH (1 would freeze the first frame), else a ValueError saying so."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"temporal smoothing strength must be a number from 0 (off) to {MAX_STRENGTH}, not "
                         f"{strength!r}")
    return float(strength)


class TemporalSmoother:
    """Feed a clip's segmentations in frame order, each with the flow from the previous frame; get them back
    smoothed (see the module's docstring). Holds one frame's probabilities between calls."""

    def __init__(self, strength: float, prob_thd: float) -> None:
        self.strength = check_strength(strength)
        self.prob_thd = float(prob_thd)
        self._prev: np.ndarray | None = None  # the last smoothed probabilities [H, W, C] float32

    def __call__(self, seg: object, flow: Flow | None) -> object:
        """The smoothed segmentation of the next frame (`seg` itself at strength 0 and on the first frame).

        `seg` is a Segmentation or CompactSegmentation before SAM refinement; `flow` comes from the previous frame
        (None on the first)."""
        if self.strength == 0:
            return seg
        if getattr(seg, "refined", False):
            raise ValueError("temporal smoothing works on the classification: smooth before SAM refinement")
        probs = seg.probs.float().cpu()
        cur = probs.permute(1, 2, 0).numpy()
        first = self._prev is None
        if not first:
            if flow is None:
                raise ValueError("temporal smoothing needs the flow from the previous frame on every frame after "
                                 "the first")
            if tuple(flow.size) != tuple(cur.shape[:2]):
                raise ValueError(f"the frames smoothing follows are {flow.size[1]}x{flow.size[0]} pixels, the "
                                 f"segmentation {cur.shape[1]}x{cur.shape[0]}: connect the segmented frames")
            if self._prev.shape != cur.shape:
                raise ValueError(f"frame of {cur.shape[1]}x{cur.shape[0]} pixels with {cur.shape[2]} classes after "
                                 f"one of {self._prev.shape[1]}x{self._prev.shape[0]} with {self._prev.shape[2]}: a "
                                 "clip's frames must have one size and one class list")
            s = np.float32(self.strength)
            blended = (np.float32(1) - s) * cur + s * warp_maps(self._prev, flow)
            cur = np.where(flow.visible[..., None], blended, cur)
        self._prev = np.ascontiguousarray(cur, dtype=np.float32)
        if first:
            return seg
        smoothed = torch.from_numpy(self._prev).permute(2, 0, 1).to(seg.labels.device)
        labels = labels_from_probs(smoothed, seg.classes, self.prob_thd).to(seg.labels.dtype)
        return Segmentation(labels, smoothed.clone(), seg.grid_logits, seg.classes, tuple(seg.image_size),
                            info={**seg.info, "temporal_strength": self.strength})


class FrameSmoother:
    """A TemporalSmoother fed with the frames themselves (the nodes' image batches): `smoother(seg, frame)` computes
    the flow from the previous frame (RGB uint8) and smooths; at strength 0 it returns `seg` and computes nothing."""

    def __init__(self, strength: float, prob_thd: float) -> None:
        self.smoother = TemporalSmoother(strength, prob_thd)
        self.flows = FlowStream() if self.smoother.strength else None

    def __call__(self, seg: object, frame: np.ndarray) -> object:
        return seg if self.flows is None else self.smoother(seg, self.flows.push(frame))


def label_flicker(prev: np.ndarray, cur: np.ndarray, flow: Flow) -> tuple[int, int]:
    """(pixels whose label differs from the previous frame's label carried along the flow, pixels compared):
    the visible pixels only (occluded and newly entered ones may rightly change)."""
    changed = (warp_labels(np.asarray(prev), flow) != np.asarray(cur)) & flow.visible
    return int(changed.sum()), int(flow.visible.sum())


class FlickerMeter:
    """A clip's flicker: the share of compared pixels whose label changed from one frame to the next."""

    def __init__(self) -> None:
        self.changed = self.compared = 0
        self._prev: np.ndarray | None = None

    def push(self, labels: np.ndarray, flow: Flow | None) -> None:
        """The next frame's labels [H, W] and the flow from the previous frame (None on the first)."""
        if self._prev is not None and flow is not None:
            changed, compared = label_flicker(self._prev, labels, flow)
            self.changed += changed
            self.compared += compared
        self._prev = np.asarray(labels).copy()

    @property
    def flicker(self) -> float:
        return self.changed / self.compared if self.compared else 0.0
