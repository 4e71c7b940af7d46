"""Objects out of a label map: the connected regions of chosen classes, for detailer and crop-and-inpaint tools.

An object is one 8-connected region of one class's pixels with at least `min_area` pixels. Order (stable, the
same on every run): frame, then class index, then the region's first pixel in reading order (top-most row, then
left-most pixel of that row). Boxes are (x1, y1, x2, y2) with exclusive ends, as Impact-Pack's SEG bbox."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from .marker import INSTANCES, INSTANCES_JSON
from .outputs import numbered, save_png

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Instance:
    """One object: its frame, class, box, pixel count, mean class probability and its mask inside the box."""

    frame: int
    class_index: int
    class_name: str
    box: Box
    area: int
    confidence: float
    mask: np.ndarray  # bool [y2 - y1, x2 - x1]

    def full_mask(self, size: tuple[int, int]) -> np.ndarray:
        """The object's mask at the image's size (bool [H, W])."""
        out = np.zeros(size, dtype=bool)
        x1, y1, x2, y2 = self.box
        out[y1:y2, x1:x2] = self.mask
        return out

    def as_dict(self) -> dict:
        """JSON-ready description (no mask)."""
        return {"frame": self.frame, "class": self.class_name, "class_index": self.class_index,
                "box": list(self.box), "area": self.area, "confidence": round(self.confidence, 6)}


def mask_stack(objects: list[Instance], size: tuple[int, int]) -> torch.Tensor:
    """The objects' masks at the image's size, float32 [objects, H, W] (one empty mask when there is none), each
    written into the batch from its box: no full-size temporary per object, whatever the number of frames."""
    out = torch.zeros((max(len(objects), 1), *size), dtype=torch.float32)
    for i, obj in enumerate(objects):
        x1, y1, x2, y2 = obj.box
        out[i, y1:y2, x1:x2] = torch.from_numpy(obj.mask)
    return out


MIN_AREA, MAX_OBJECTS = 64, 256  # the smallest object and the most objects, when not given (nodes, command line)


def check_min_area(min_area: int) -> int:
    """`min_area` as an int >= 1, or a ValueError naming the allowed range."""
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
        raise ValueError(f"min_area must be a whole number of pixels >= 1, not {min_area!r}")
    return int(min_area)


def check_max_objects(max_objects: int) -> int:
    """`max_objects` as an int >= 1, or a ValueError naming the allowed range."""
    if isinstance(max_objects, bool) or not isinstance(max_objects, (int, np.integer)) or max_objects < 1:
        raise ValueError(f"max_objects must be a whole number >= 1, not {max_objects!r}")
    return int(max_objects)


def find_instances(labels: torch.Tensor | np.ndarray, class_indices: list[int], class_names: list[str],
                   min_area: int = 1, probs: torch.Tensor | None = None, frame: int = 0) -> list[Instance]:
    """The objects of the given classes in one label map [H, W] (see the module's docstring for the order).

    `probs` [C, H, W], when given, makes each object's confidence its class's mean probability over its pixels
    (1.0 without)."""
    return find_largest_instances(labels, class_indices, class_names, min_area, probs, frame)[0]


def find_largest_instances(labels: torch.Tensor | np.ndarray, class_indices: list[int], class_names: list[str],
                           min_area: int = 1, probs: torch.Tensor | None = None, frame: int = 0,
                           max_objects: int | None = None) -> tuple[list[Instance], int]:
    """`find_instances` keeping at most `max_objects` objects, the largest (ties: the earlier), in the same order;
    and how many were dropped. Only the kept objects' masks are cut out, so a noisy label map costs no memory."""
    min_area = check_min_area(min_area)
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    found = []  # (class, region id, x, y, w, h, area) in the output order
    for k in sorted(set(class_indices)):
        _, comp, stats = _regions(lab, k)
        ids, first = np.unique(comp.reshape(-1), return_index=True)  # first pixel of each region, reading order
        order = [int(i) for _, i in sorted(zip(first[ids > 0], ids[ids > 0]))]
        found += [(k, i, *(int(v) for v in stats[i])) for i in order if stats[i][4] >= min_area]
    keep = list(range(len(found)))
    if max_objects is not None and len(found) > check_max_objects(max_objects):
        keep = sorted(sorted(keep, key=lambda j: (-found[j][6], j))[:max_objects])
    out, comp, comp_class = [], None, None
    for k, i, x, y, w, h, area in (found[j] for j in keep):
        if comp_class != k:  # one class's components at a time (the kept objects come class by class)
            comp, comp_class = _regions(lab, k)[1], k
        mask = comp[y:y + h, x:x + w] == i
        conf = float(probs[k, y:y + h, x:x + w].float().cpu().numpy()[mask].mean()) if probs is not None else 1.0
        out.append(Instance(frame, k, class_names[k], (x, y, x + w, y + h), area, conf, mask))
    return out, len(found) - len(out)


def _regions(lab: np.ndarray, k: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The 8-connected regions of class k's pixels: count (with the background), region ids [H, W], stats."""
    count, comp, stats, _ = cv2.connectedComponentsWithStats((lab == k).astype(np.uint8), connectivity=8,
                                                              ltype=cv2.CV_32S)
    return count, comp, stats


def check_crop_factor(crop_factor: float) -> float:
    """`crop_factor` if it lies in 1..100, else a ValueError naming the range."""
    if not 1.0 <= crop_factor <= 100.0:
        raise ValueError(f"crop_factor must be between 1 and 100, not {crop_factor!r}")
    return crop_factor


def crop_region(box: Box, size: tuple[int, int], crop_factor: float) -> Box:
    """The box grown `crop_factor` times around its centre and moved (not cut) to lie inside an image of `size`
    (H, W): the context a detailer crops. It always contains the box."""
    check_crop_factor(crop_factor)
    x1, y1, x2, y2 = box
    xs = _span(x1, x2, crop_factor, size[1])
    ys = _span(y1, y2, crop_factor, size[0])
    return xs[0], ys[0], xs[1], ys[1]


def _span(lo: int, hi: int, factor: float, limit: int) -> tuple[int, int]:
    """[lo, hi) grown to about factor x its length around its centre, shifted to lie within [0, limit)."""
    length = min(limit, max(hi - lo, int(round((hi - lo) * factor))))
    start = min(max((lo + hi - length) // 2, 0), limit - length)
    return start, start + length


def write_instances(objects: list[Instance], size: tuple[int, int], folder: Path) -> Path:
    """One white-on-black PNG per object in `folder`/instances/ (NNN_<class>.png, NNN in the objects' order, padded
    to sort) and `folder`/instances.json listing each object (frame, class, box, area, confidence) with its mask's
    file name."""

    masks = folder / INSTANCES
    masks.mkdir(parents=True, exist_ok=True)
    records = []
    for i, obj in enumerate(objects):
        name = numbered(i, len(objects), obj.class_name)
        save_png(obj.full_mask(size).astype(np.uint8) * 255, masks / name)
        records.append({**obj.as_dict(), "mask": f"{INSTANCES}/{name}"})
    path = folder / INSTANCES_JSON
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path
