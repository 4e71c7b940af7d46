"""A clip's tracked objects, as the tracker (tracking.py) leaves them: per object its id, class and, per frame where
it was seen, its box, area, confidence and its mask inside the box, bit-packed (1 bit per pixel of the box).
Full-size masks are made only when asked, one object or one frame at a time."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

import numpy as np
import torch

from .instances import Box, crop_region


@dataclass(frozen=True, eq=False)
class Observation:
    """One frame of one track: its box (x1, y1, x2, y2, ends exclusive), pixel count, mean class probability and
    its mask inside the box, bit-packed."""

    frame: int
    box: Box
    area: int
    confidence: float
    bits: np.ndarray

    @classmethod
    def of(cls, frame: int, box: Box, mask: np.ndarray, confidence: float) -> Observation:
        return cls(frame, box, int(mask.sum()), confidence, np.packbits(mask, axis=None))

    def mask(self) -> np.ndarray:
        """The mask inside the box (bool [y2 - y1, x2 - x1])."""
        x1, y1, x2, y2 = self.box
        return np.unpackbits(self.bits, count=(y2 - y1) * (x2 - x1)).reshape(y2 - y1, x2 - x1).view(bool)

    def as_dict(self) -> dict:
        return {"frame": self.frame, "box": list(self.box), "area": self.area,
                "confidence": round(self.confidence, 6)}


@dataclass(frozen=True, eq=False)
class Track:
    """One object over the clip: its id (1-based, in order of first appearance), class, and its observations in
    frame order (frames where it was not seen have none)."""

    id: int
    class_index: int
    class_name: str
    observations: tuple[Observation, ...]

    @property
    def first_frame(self) -> int:
        return self.observations[0].frame

    @property
    def last_frame(self) -> int:
        return self.observations[-1].frame

    @property
    def confidence(self) -> float:
        """The area-weighted mean of its frames' confidences."""
        area = sum(o.area for o in self.observations)
        return sum(o.confidence * o.area for o in self.observations) / area if area else 0.0

    def box(self) -> Box:
        """The union of its boxes over the clip."""
        boxes = np.array([o.box for o in self.observations])
        return (int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max()))

    def crop_region(self, size: tuple[int, int], crop_factor: float) -> Box:
        """One crop for the whole clip: the union of its boxes grown `crop_factor` times, inside the image."""
        return crop_region(self.box(), size, crop_factor)

    def masks(self, num_frames: int, size: tuple[int, int], region: Box | None = None) -> np.ndarray:
        """Its mask in every frame, bool [num_frames, H, W] (empty where it was not seen), or cut to `region`
        (x1, y1, x2, y2): [num_frames, y2 - y1, x2 - x1]."""
        region = region or (0, 0, size[1], size[0])
        return self.write_masks(np.zeros((num_frames, region[3] - region[1], region[2] - region[0]), dtype=bool),
                                region)

    def write_masks(self, out: np.ndarray, region: Box) -> np.ndarray:
        """Its mask in every frame written into `out` ([frames, y2 - y1, x2 - x1] of any dtype, zeros where it was
        not seen: 1 inside the mask, 0 around it), cut to `region` (x1, y1, x2, y2); a frame at a time, so a float
        output costs no full-size temporary."""
        for o in self.observations:
            place(out[o.frame], region, o.box, o.mask())
        return out

    def mask(self, frame: int, size: tuple[int, int], region: Box | None = None) -> np.ndarray:
        """Its mask in one frame, bool [H, W] (or cut to `region`), empty where it was not seen."""
        region = region or (0, 0, size[1], size[0])
        obs = self.at(frame)
        if obs is None:
            return np.zeros((region[3] - region[1], region[2] - region[0]), dtype=bool)
        return paste(region, obs.box, obs.mask())

    def at(self, frame: int) -> Observation | None:
        """Its observation in `frame`, or None when it was not seen there."""
        i = bisect.bisect_left([o.frame for o in self.observations], frame)
        return self.observations[i] if i < len(self.observations) and self.observations[i].frame == frame else None

    def as_dict(self) -> dict:
        """JSON-ready: id, class, class_index, first and last frame, confidence and each frame's box, area and
        confidence."""
        return {"id": self.id, "class": self.class_name, "class_index": self.class_index,
                "first_frame": self.first_frame, "last_frame": self.last_frame,
                "confidence": round(self.confidence, 6), "frames": [o.as_dict() for o in self.observations]}


@dataclass(frozen=True, eq=False)
class TrackedObjects:
    """A clip's tracks (in id order), its number of frames and frame size (H, W)."""

    tracks: tuple[Track, ...]
    num_frames: int
    size: tuple[int, int]

    def to_json(self) -> str:
        return json.dumps([t.as_dict() for t in self.tracks], indent=1)

    def largest(self, max_objects: int) -> tuple[TrackedObjects, int]:
        """At most `max_objects` tracks: those covering the most pixels over the clip (ties: the lower id), in id
        order, their ids kept; and how many were dropped."""
        order = sorted(self.tracks, key=lambda t: (-sum(o.area for o in t.observations), t.id))
        kept = tuple(sorted(order[:max_objects], key=lambda t: t.id))
        return TrackedObjects(kept, self.num_frames, self.size), len(self.tracks) - len(kept)

    def mask_batch(self) -> torch.Tensor:
        """Every track's mask in every frame, float32 [tracks x frames, H, W], track by track (frame k of the i-th
        track at i x frames + k): the order of Impact-Pack's SEGS to Mask Batch."""
        n, (h, w) = self.num_frames, self.size
        out = torch.zeros((len(self.tracks) * n, h, w), dtype=torch.float32)
        for i, t in enumerate(self.tracks):
            t.write_masks(out[i * n:(i + 1) * n].numpy(), (0, 0, w, h))
        return out

    def frame_objects(self, frame: int) -> list[tuple[int, Observation]]:
        """The objects seen in one frame as (id, observation), by id (what render.render_tracks draws)."""
        return [(t.id, t.at(frame)) for t in self.tracks if t.at(frame) is not None]


def paste(canvas_box: Box, box: Box, values: np.ndarray, fill: float = 0) -> np.ndarray:
    """`values` (placed at `box`) on a canvas covering `canvas_box`, `fill` elsewhere."""
    cx1, cy1, cx2, cy2 = canvas_box
    return place(np.full((cy2 - cy1, cx2 - cx1, *values.shape[2:]), fill, dtype=values.dtype), canvas_box, box,
                 values)


def place(out: np.ndarray, canvas_box: Box, box: Box, values: np.ndarray) -> np.ndarray:
    """`values` (placed at `box`) written into `out`, a canvas covering `canvas_box` (the part inside it)."""
    cx1, cy1 = canvas_box[:2]
    x1, y1, x2, y2 = max(box[0], cx1), max(box[1], cy1), min(box[2], canvas_box[2]), min(box[3], canvas_box[3])
    if x1 < x2 and y1 < y2:
        out[y1 - cy1:y2 - cy1, x1 - cx1:x2 - cx1] = values[y1 - box[1]:y2 - box[1], x1 - box[0]:x2 - box[0]]
    return out
