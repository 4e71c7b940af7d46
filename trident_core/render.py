"""Pictures of a segmentation: a colour label map, an overlay on the image, a legend, masks."""

from __future__ import annotations

import colorsys
import math
import numbers
import unicodedata

import numpy as np
import torch

from .classes import UNLABELED

OVERLAY_BLOCK = 1 << 18  # values blended at a time (whole rows): float32 temporaries of 1 MB, not the image's


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8 [n, 3]): golden-ratio hues at alternating lightness."""
    cols = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        l_, s = (0.55, 0.75) if i % 2 == 0 else (0.42, 0.85)
        cols.append([round(255 * c) for c in colorsys.hls_to_rgb(h, l_, s)])
    return np.array(cols, dtype=np.uint8).reshape(n, 3)


def color_labels(labels: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """HxWx3 uint8 colour map; unlabeled pixels are black."""
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    pal = np.concatenate([palette(num_classes), np.zeros((1, 3), np.uint8)])
    return pal[np.where(lab == UNLABELED, num_classes, lab)]


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with a colour map (uint8); `alpha` from 0 (the image) to 1 (the colours)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:  # (NaN: refused)
        raise ValueError(f"alpha must be a number from 0 (the image only) to 1 (the colours only), not {alpha!r}")
    out = np.empty(np.broadcast_shapes(image.shape, colors.shape), np.uint8)
    image, colors = np.broadcast_to(image, out.shape), np.broadcast_to(colors, out.shape)
    rows = max(1, OVERLAY_BLOCK // max(1, math.prod(out.shape[1:])))
    for a in range(0, len(out), rows):  # (in blocks of rows: no full-size float32 temporaries)
        block = image[a:a + rows].astype(np.float32) * (1 - alpha) + colors[a:a + rows].astype(np.float32) * alpha
        out[a:a + rows] = np.clip(np.rint(block), 0, 255)
    return out


_LETTERS = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "ł": "l",
                          "Ł": "L", "đ": "d", "Đ": "D", "þ": "th", "ð": "d"})  # (no accent to drop: NFKD keeps them)


def drawable(name: str) -> str:
    """A name as OpenCV's Hershey font can draw it (ASCII): accents dropped ("café" -> "cafe"), letters it has no
    form for (CJK, Cyrillic) as "?", which the font would draw anyway."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", name.translate(_LETTERS))
                    if not unicodedata.combining(c))
    return plain.encode("ascii", "replace").decode("ascii")


def legend(names: list[str], width: int, row: int = 22) -> np.ndarray:
    """A strip listing each class name next to its colour (uint8 HxWx3), to put under a colour map."""
    import cv2

    pal = palette(len(names))
    per_line = max(1, width // 180)
    lines = (len(names) + per_line - 1) // per_line
    img = np.full((lines * row + 6, width, 3), 255, np.uint8)
    cell = width // per_line
    for i, name in enumerate(names):
        y, x = 3 + (i // per_line) * row, (i % per_line) * cell + 4
        img[y + 3:y + row - 3, x:x + 16] = pal[i]
        cv2.putText(img, drawable(name)[:24], (x + 22, y + row - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return img


def preview(labels: torch.Tensor | np.ndarray, names: list[str], image: np.ndarray, alpha: float = 0.5,
            show_legend: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The colour label map and its overlay on the image (uint8 HxWx3), each with the class legend below it when
    `show_legend`; refuses an image of another size than the labels."""
    if image.shape[:2] != tuple(labels.shape):
        raise ValueError(f"the image is {image.shape[1]}x{image.shape[0]}, the segmentation "
                         f"{labels.shape[1]}x{labels.shape[0]}: connect the segmented image")
    colors = color_labels(labels, len(names))
    blended = overlay(image, colors, alpha)
    if not show_legend:
        return colors, blended
    strip = legend(names, colors.shape[1])
    return np.concatenate([colors, strip]), np.concatenate([blended, strip])


def masks_for(labels: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Float mask [H, W] of the union of the given classes."""
    if not indices:
        return torch.zeros(labels.shape, dtype=torch.float32)
    idx = torch.tensor(indices, device=labels.device)
    return torch.isin(labels, idx).float()


def track_color(track_id: int) -> np.ndarray:
    """The colour of a tracked object (uint8 [3]): fixed by its id, the same in every frame."""
    return palette(track_id + 1)[track_id]


def render_tracks(image: np.ndarray, objects: list, alpha: float = 0.5) -> np.ndarray:
    """A frame (RGB uint8) with each object, given as (id, observation with `box` and `mask()`), in its id's
    colour and its id written at the top left of its box."""
    import cv2

    out = image.copy()
    for track_id, obs in objects:
        x1, y1, x2, y2 = obs.box
        crop, mask = out[y1:y2, x1:x2], obs.mask()
        crop[mask] = overlay(crop[mask], np.broadcast_to(track_color(track_id), crop[mask].shape), alpha)
    scale = max(0.45, min(image.shape[:2]) / 700)  # readable on a small frame, in proportion on a large one
    thick = max(1, round(scale * 2))
    for track_id, obs in objects:  # the numbers over every object's colour
        x1, y1 = obs.box[:2]
        text, org = str(track_id), (x1 + 1, y1 + round(13 * scale / 0.45))
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, tuple(int(c) for c in track_color(track_id)),
                    thick, cv2.LINE_AA)
    return out
