"""Synthetic clips with known ground truth for the tracking tests and benchmarks/video.py: textured shapes moving
over a photograph (crossing, leaving and re-entering the frame, passing behind a pillar, under a camera pan),
each frame's visible mask of every object, and the identity measure of a tracker's result against them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

Path2D = Callable[[int], "tuple[float, float] | None"]  # frame -> centre (world coordinates) or None (absent)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A real photograph (scikit-image's, when installed) resized to height x width, else a smooth random
    texture: RGB uint8."""
    try:
        from skimage import data

        img = [data.astronaut, data.coffee, data.chelsea, data.rocket][seed % 4]()
        return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    except ImportError:
        rng = np.random.default_rng(seed)
        noise = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
        return cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)


def linear(start: tuple[float, float], velocity: tuple[float, float], frames: range | None = None) -> Path2D:
    """A straight path at constant velocity, present in `frames` (every frame when None)."""
    def at(k: int) -> tuple[float, float] | None:
        if frames is not None and k not in frames:
            return None
        return start[0] + velocity[0] * k, start[1] + velocity[1] * k
    return at


def out_and_back(start: tuple[float, float], speed: float, turn: int) -> Path2D:
    """Moves right at `speed` until frame `turn`, then back left at the same speed."""
    return lambda k: (start[0] + speed * (k if k <= turn else 2 * turn - k), start[1])


@dataclass(frozen=True)
class Shape:
    """An object: its class index, shape ("disc", "square", "triangle"), radius, path and depth (higher in
    front); its texture is cut from a photograph and moves with it."""

    class_index: int
    kind: str
    radius: int
    path: Path2D
    depth: int = 0
    tint: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Scene:
    """A clip: frame size, number of frames, background photo (larger than the frame for a pan), the camera's
    offset per frame, the shapes and static pillars (world boxes x1, y1, x2, y2 drawn in front of every shape,
    labelled `pillar_class`)."""

    size: tuple[int, int]
    frames: int
    shapes: list[Shape]
    pan: tuple[float, float] = (0.0, 0.0)
    pillars: list[tuple[int, int, int, int]] = field(default_factory=list)
    pillar_class: int = 0
    seed: int = 0

    def _mask(self, shape: Shape, centre: tuple[float, float], offset: np.ndarray) -> np.ndarray:
        h, w = self.size
        m = np.zeros((h, w), np.uint8)
        cx, cy = centre[0] - offset[0], centre[1] - offset[1]
        r = shape.radius
        if shape.kind == "disc":
            cv2.circle(m, (round(cx), round(cy)), r, 1, -1)
        elif shape.kind == "square":
            cv2.rectangle(m, (round(cx - r), round(cy - r)), (round(cx + r), round(cy + r)), 1, -1)
        else:
            pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]]).round().astype(np.int32)
            cv2.fillPoly(m, [pts], 1)
        return m.astype(bool)

    def render(self) -> list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
        """Per frame: the RGB image, the label map (0 background) and each shape's visible mask (shapes order)."""
        h, w = self.size
        span = np.abs(np.array(self.pan)) * self.frames + 2
        world = photo(h + int(span[1]), w + int(span[0]), self.seed)
        textures = [photo(2 * s.radius + 2, 2 * s.radius + 2, self.seed + 1 + i) for i, s in enumerate(self.shapes)]
        out = []
        for k in range(self.frames):
            offset = np.array(self.pan) * k
            if self.pan[0] < 0:
                offset[0] += span[0] - 2
            if self.pan[1] < 0:
                offset[1] += span[1] - 2
            m = np.float32([[1, 0, -offset[0]], [0, 1, -offset[1]]])
            image = cv2.warpAffine(world, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            labels = np.zeros((h, w), np.int64)
            owner = np.full((h, w), -1)
            for i in sorted(range(len(self.shapes)), key=lambda i: self.shapes[i].depth):
                s = self.shapes[i]
                centre = s.path(k)
                if centre is None:
                    continue
                mask = self._mask(s, centre, offset)
                tex = np.clip(textures[i].astype(int) + s.tint, 0, 255).astype(np.uint8)
                tm = np.float32([[1, 0, centre[0] - offset[0] - s.radius - 1],
                                 [0, 1, centre[1] - offset[1] - s.radius - 1]])
                layer = cv2.warpAffine(tex, tm, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
                image[mask] = layer[mask]
                labels[mask] = s.class_index
                owner[mask] = i
            for x1, y1, x2, y2 in self.pillars:
                px1, py1 = round(x1 - offset[0]), round(y1 - offset[1])
                px2, py2 = round(x2 - offset[0]), round(y2 - offset[1])
                sl = (slice(max(py1, 0), max(py2, 0)), slice(max(px1, 0), max(px2, 0)))
                image[sl] = (image[sl] // 3 + 120).astype(np.uint8)
                labels[sl] = self.pillar_class
                owner[sl] = -1
            out.append((image, labels, [owner == i for i in range(len(self.shapes))]))
        return out


def identity_measure(truth: list[list[np.ndarray]], frame_masks: list[dict[int, np.ndarray]],
                     min_area: int = 1, iou: float = 0.5) -> dict:
    """How a tracker's objects follow the true ones. Per frame, true objects (visible masks of at least
    `min_area` pixels) and tracked objects (id -> mask) are paired one to one, best IoU first, at IoU >= `iou`.

    `switches`: over the clip, the ids each true object was paired with beyond its first, plus the true objects
    each id was paired with beyond its first. `returns`: the times a true object came back after missing frames,
    `refound` those where it was paired with the id it had before."""
    ids_of: dict[int, set[int]] = {}
    truths_of: dict[int, set[int]] = {}
    last_id: dict[int, int] = {}
    last_seen: dict[int, int] = {}
    returns = refound = paired = visible = 0
    for k, (true_masks, tracked) in enumerate(zip(truth, frame_masks)):
        cand = []
        for g, tm in enumerate(true_masks):
            if tm.sum() < min_area:
                continue
            visible += 1
            for tid, m in tracked.items():
                inter = int((tm & m).sum())
                if inter:
                    cand.append((inter / int((tm | m).sum()), g, tid))
        used_g, used_t = set(), set()
        for score, g, tid in sorted(cand, reverse=True):
            if score < iou or g in used_g or tid in used_t:
                continue
            used_g.add(g)
            used_t.add(tid)
            paired += 1
            ids_of.setdefault(g, set()).add(tid)
            truths_of.setdefault(tid, set()).add(g)
            if g in last_seen and last_seen[g] < k - 1:
                returns += 1
                refound += int(last_id[g] == tid)
            last_id[g], last_seen[g] = tid, k
    switches = sum(len(v) - 1 for v in ids_of.values()) + sum(len(v) - 1 for v in truths_of.values())
    return {"switches": switches, "returns": returns, "refound": refound, "paired": paired, "visible": visible}


def scenes(size: tuple[int, int] = (96, 128), gap: int = 6) -> dict[str, Scene]:
    """The test scenes (objects of classes 1 and 2, pillars of class 3), `gap` the longest absence in each."""
    h, w = size
    r = max(6, h // 9)
    mid = h / 2
    turn = -(-4 * r // 4) + (gap - 1) // 2  # out of the frame (centre >= w + r) for 2 * ((gap - 1) // 2) + 1 frames
    half_pillar = r + 1 + 3 * gap // 2  # a square of side 2r at 3 pixels per frame is hidden about `gap` frames
    return {
        "crossing": Scene(size, 36, [
            Shape(1, "disc", r, linear((r + 2, mid - 3), (3, 0)), depth=1, tint=(40, 0, 0)),
            Shape(1, "disc", r, linear((w - r - 2, mid + 3), (-3, 0)), depth=0, tint=(0, 0, 40)),
            Shape(2, "square", r - 2, linear((w / 2, r), (0.5, 1.5)), depth=2)], seed=0),
        "leave_and_return": Scene(size, 40, [
            Shape(1, "disc", r, out_and_back((w - 3 * r, mid), 4, turn)),
            Shape(2, "triangle", r, linear((2 * r, mid - r), (0.5, 0.3)))], seed=1),
        "pillar": Scene(size, 40, [
            Shape(1, "square", r, linear((r + 1, mid), (3, 0.2))),
            Shape(1, "disc", r, linear((w - r - 2, r + 2), (-0.5, 0.3)))],
            pillars=[(w // 2 - half_pillar, 0, w // 2 + half_pillar, h)],
            pillar_class=3, seed=2),
        "pan": Scene(size, 36, [
            Shape(1, "disc", r, linear((w / 3, mid), (1, 0.3))),
            Shape(1, "triangle", r, linear((2 * w / 3, mid), (0.5, -0.4))),
            Shape(2, "square", r, linear((w / 2, r + 2), (0, 0.5)))], pan=(3.0, 0.5), seed=3),
    }
