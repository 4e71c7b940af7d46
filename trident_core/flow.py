"""Dense optical flow between consecutive video frames (OpenCV's DIS) and the warps that carry a previous frame's
maps (probabilities, label maps, object masks) into the current frame.

The flow is estimated on grey frames at most `MAX_FLOW_SIDE` pixels long (a larger frame is downscaled: the flow
of a video's motion needs no more detail, and DIS's cost grows with the pixels), both ways, and upsampled. A pixel
of the current frame is `visible` when the place it came from lies inside the previous frame and the forward
flow from there leads back to it (Sundaram et al.'s forward-backward check): occluded, disoccluded and newly
entered pixels are not, and take the current frame alone wherever a previous map would be carried over."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MAX_FLOW_SIDE = 512
MIN_FLOW_SIDE = 16
MIN_FLOW_SHORT = 32  # DIS fails on thinner frames (its pyramid needs both sides): they are padded for the flow
FINEST_SIDE = 256  # DIS refines down to the coarsest pyramid level at least this long (finer ones cost 4x each)
FB_ALPHA, FB_BETA = 0.01, 0.5  # consistent: |back + forward|^2 <= alpha (|back|^2 + |forward|^2) + beta (pixels^2)


@dataclass(frozen=True, eq=False)
class Flow:
    """The motion from the previous frame to the current one at the frames' size (H, W).

    `source` [H, W, 2] float32: for each current pixel, the (x, y) it came from in the previous frame. `visible`
    [H, W] bool: that place is in view and the forward-backward check passed. `forward` [h, w, 2] float32: the
    previous frame's pixels' motion into the current one, at the flow's scale `scale` (h = H x scale)."""

    source: np.ndarray
    visible: np.ndarray
    forward: np.ndarray
    scale: float

    @property
    def size(self) -> tuple[int, int]:
        return self.source.shape[:2]

    def motion_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The forward motion [n, 2] (dx, dy in the frames' pixels) of previous-frame pixels (xs, ys)."""
        h, w = self.forward.shape[:2]
        fx = np.clip(np.rint((xs + 0.5) * self.scale - 0.5), 0, w - 1).astype(np.intp)
        fy = np.clip(np.rint((ys + 0.5) * self.scale - 0.5), 0, h - 1).astype(np.intp)
        return self.forward[fy, fx] / self.scale


def _grey(image: np.ndarray, scale: float) -> np.ndarray:
    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale == 1.0:
        return g
    h, w = g.shape
    return cv2.resize(g, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _pad_to(g: np.ndarray, side: int) -> np.ndarray:
    """`g` with its last rows and columns repeated until both sides are at least `side` long."""
    h, w = g.shape
    if h >= side and w >= side:
        return g
    return cv2.copyMakeBorder(g, 0, max(0, side - h), 0, max(0, side - w), cv2.BORDER_REPLICATE)


def _grid(h: int, w: int) -> np.ndarray:
    """[h, w, 2] float32 pixel coordinates (x, y)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.dstack([xs, ys])


def estimate_flow(prev: np.ndarray, cur: np.ndarray, max_side: int = MAX_FLOW_SIDE) -> Flow:
    """The flow from RGB uint8 frame `prev` to `cur` (same size), estimated at most `max_side` pixels long."""
    if prev.shape != cur.shape:
        raise ValueError(f"frames of different sizes ({prev.shape[1]}x{prev.shape[0]} then {cur.shape[1]}x"
                         f"{cur.shape[0]}) have no flow between them")
    h, w = cur.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    scale = max(scale, MIN_FLOW_SIDE / max(h, w))  # DIS takes no smaller frames: tiny ones are upscaled
    a, b = _grey(prev, scale), _grey(cur, scale)
    lh, lw = a.shape
    a, b = _pad_to(a, MIN_FLOW_SHORT), _pad_to(b, MIN_FLOW_SHORT)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(max(0, int(np.log2(max(a.shape) / FINEST_SIDE))))
    back = np.ascontiguousarray(dis.calc(b, a, None)[:lh, :lw])  # current -> previous
    forward = np.ascontiguousarray(dis.calc(a, b, None)[:lh, :lw])
    src = _grid(lh, lw) + back
    fwd_there = cv2.remap(forward, src[..., 0], src[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    err = ((back + fwd_there) ** 2).sum(axis=2)
    ok = err <= FB_ALPHA * ((back ** 2).sum(axis=2) + (fwd_there ** 2).sum(axis=2)) + FB_BETA
    if (lh, lw) != (h, w):
        back = cv2.resize(back, (w, h), interpolation=cv2.INTER_LINEAR) * np.float32([w / lw, h / lh])
        ok = cv2.resize(ok.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    source = _grid(h, w) + back
    inside = (source[..., 0] >= 0) & (source[..., 0] <= w - 1) & (source[..., 1] >= 0) & (source[..., 1] <= h - 1)
    return Flow(source, ok & inside, forward, lw / w)


def warp_maps(prev: np.ndarray, flow: Flow) -> np.ndarray:
    """A previous frame's maps [H, W, C] (or [H, W]) float32 carried into the current frame (bilinear); values at
    pixels that are not `visible` are meaningless (the current frame's take their place)."""
    def remap(maps: np.ndarray) -> np.ndarray:
        return cv2.remap(maps, flow.source[..., 0], flow.source[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    if prev.ndim == 2 or prev.shape[2] <= 4:
        return remap(prev)
    return np.dstack([remap(np.ascontiguousarray(prev[..., i:i + 4])) for i in range(0, prev.shape[2], 4)])


def warp_labels(prev: np.ndarray, flow: Flow) -> np.ndarray:
    """A previous frame's label map [H, W] carried into the current frame (nearest pixel)."""
    h, w = prev.shape
    xs = np.clip(np.rint(flow.source[..., 0]), 0, w - 1).astype(np.intp)
    ys = np.clip(np.rint(flow.source[..., 1]), 0, h - 1).astype(np.intp)
    return prev[ys, xs]


def warp_crop(mask: np.ndarray, origin: tuple[int, int], flow: Flow, box: tuple[int, int, int, int]) -> np.ndarray:
    """A previous-frame mask (uint8/bool [h, w], its top-left pixel at `origin` (x, y)) carried into the current
    frame's `box` (x1, y1, x2, y2): float32 [y2 - y1, x2 - x1] in 0..1 (bilinear), 0 where not `visible`."""
    x1, y1, x2, y2 = box
    src = flow.source[y1:y2, x1:x2]
    out = cv2.remap(mask.astype(np.float32), src[..., 0] - np.float32(origin[0]), src[..., 1] - np.float32(origin[1]),
                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.where(flow.visible[y1:y2, x1:x2], out, np.float32(0))


class FlowStream:
    """Frames in order, one at a time: `push(frame)` returns the flow from the previous frame (None for the first)."""

    def __init__(self, max_side: int = MAX_FLOW_SIDE) -> None:
        self.max_side = max_side
        self._prev: np.ndarray | None = None

    def push(self, frame: np.ndarray) -> Flow | None:
        prev, self._prev = self._prev, frame
        return None if prev is None else estimate_flow(prev, frame, self.max_side)
