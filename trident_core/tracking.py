"""Objects that keep their identity over a video: the objects of each frame (instances.py's connected regions)
matched to the previous frames' objects of the same class by their overlap after motion compensation.

Feed the frames in order (`ObjectTracker.push`), each with its label map, optionally its class probabilities (for
the confidences), the flow from the previous frame (flow.py) and the frame itself (its colours). Per frame:
1. each live track predicts where it is: its last mask carried along the dense flow (pixels the flow cannot
   vouch for, occluded or disoccluded, left out), and its full shape coasting: its last whole mask not cut down
   by an occluder, moved by its own velocity (its centre's move per frame while its area holds);
2. tracks and the frame's objects are paired one to one, best overlap (IoU) first;
3. a track left without an object whose prediction lies mostly inside an object another track took (two objects
   of one class crossing: their regions merge) shares it: each pixel goes to the track whose colours it matches
   (its template's, coasted along; without the frame, whose flow-carried mask holds it), so the hidden one of the
   two, left with nothing, coasts behind the other and is found again where it comes out. A share that lasts
   more than `max_gap` frames between tracks that moved alike before it is given to one track (two parts of one
   object, reunited);
4. an object left over lying mostly inside a paired track's prediction joins it (an occluder cut the object in
   two), for at most `max_gap` frames in a row;
5. an object still left is taken by a track still unpaired (missed for at most `max_gap` frames, or seen in the
   last frame but predicted elsewhere) when it lies near where that track should be (its coasting box, held
   inside the frame, or where it was last seen: an object that left the frame and comes back);
6. any other object starts a new track. Ids are 1, 2, ... in order of first appearance (within a frame, in
   find_instances' order), so on a single frame the tracks are find_instances' objects in its order.

The result (tracks.py) keeps, per object and frame where it was seen, its box, area, confidence and its mask
cropped to the box, bit-packed: memory grows with the objects' areas, never with full frames."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from .flow import Flow, warp_crop
from .instances import Box, Instance, check_min_area, find_instances
from .tracks import Observation, Track, TrackedObjects, paste

DEFAULT_MAX_GAP = 8
MAX_GAP_LIMIT = 10_000
MIN_IOU = 0.1  # a pairing below it must still cover half of the smaller of the two
SHARE_COVER = 0.5  # a track joins a merged region holding at least this share of one of its predictions
MOTION_SAMPLES = 2048  # mask pixels whose flow bounds where a mask is carried
STILL = 0.05  # area change (share) from frame to frame under which a track's centre gives its velocity
SAME_MOTION = 1.0  # pixels per frame: tracks moving alike within this are parts of one object when they merge
ALIGN = 4  # pixels: how far a track's looks are moved to match a merged object's colours
CUT = 0.9  # a whole observation under this share of the largest recent one is taken as cut by an occluder


def check_max_gap(max_gap: int) -> int:
    """`max_gap` as an int in 0..MAX_GAP_LIMIT, else a ValueError naming the range."""
    if isinstance(max_gap, bool) or not isinstance(max_gap, (int, np.integer)) or not 0 <= max_gap <= MAX_GAP_LIMIT:
        raise ValueError(f"max_gap must be a whole number of frames from 0 to {MAX_GAP_LIMIT}, not {max_gap!r}")
    return int(max_gap)


@dataclass(eq=False)
class _Live:
    """A track being built, with what its prediction needs."""

    id: int
    class_index: int
    class_name: str
    observations: list[Observation] = field(default_factory=list)
    last: Observation | None = None
    last_whole: bool = True  # the last observation was whole objects, not a share of a merged region
    template: Observation | None = None  # its full shape: the last whole observation not cut down by an occluder
    look: np.ndarray | None = None  # the frame's pixels (RGB) in the template's box
    areas: list[tuple[int, int]] = field(default_factory=list)  # (frame, area) of its recent whole observations
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # pixels per frame
    centre: np.ndarray = field(default_factory=lambda: np.zeros(2))  # of the last observation's mask
    moved: bool = False  # velocity measured at least once
    missed: int = 0  # frames since the last observation
    shared_run: int = 0  # consecutive frames seen only as a share of a merged region
    split_run: int = 0  # consecutive frames seen in several pieces


@dataclass(eq=False)
class _Prediction:
    """Where a track should be in the current frame, in `box`: `dense` the flow-carried mask (float 0..1) or None,
    `coast` the coasting mask (bool) or None; `mask` their union (bool)."""

    box: Box
    dense: np.ndarray | None
    coast: np.ndarray | None

    @property
    def mask(self) -> np.ndarray:
        out = np.zeros((self.box[3] - self.box[1], self.box[2] - self.box[0]), dtype=bool)
        if self.dense is not None:
            out |= self.dense >= 0.5
        if self.coast is not None:
            out |= self.coast
        return out

    @property
    def hypotheses(self) -> list[np.ndarray]:
        """The flow-carried and the coasting mask (bool), those there are."""
        out = [self.dense >= 0.5] if self.dense is not None else []
        return out + ([self.coast] if self.coast is not None else [])

    def score(self) -> np.ndarray:
        """Per pixel: 2 + dense where the flow carries the track there, 1 where only its coasting mask is, else 0."""
        out = np.zeros(self.mask.shape, dtype=np.float32)
        if self.coast is not None:
            out[self.coast] = 1
        if self.dense is not None:
            out = np.where(self.dense >= 0.5, 2 + self.dense, out)
        return out


def _meet(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _union(*boxes: Box) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _tight(mask: np.ndarray, origin: tuple[int, int]) -> tuple[Box, np.ndarray] | None:
    """The bounding box (in image coordinates) and crop of a mask placed at `origin`, or None when empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return ((int(x1 + origin[0]), int(y1 + origin[1]), int(x2 + origin[0]), int(y2 + origin[1])),
            mask[y1:y2, x1:x2])


def _fit(inside: np.ndarray, prediction: np.ndarray, area: int) -> float:
    """How well a prediction (bool mask) explains an object of `area` pixels, `inside` the prediction's pixels in
    it: their IoU when at least MIN_IOU or when one holds half of the other, else 0."""
    o, pa = int(inside.sum()), int(prediction.sum())
    if not o:
        return 0.0
    iou = o / (pa + area - o)
    return iou if iou >= MIN_IOU or o >= 0.5 * min(pa, area) else 0.0


def _same_motion(a: _Live, b: _Live) -> bool:
    return bool(np.hypot(*(a.velocity - b.velocity)) < SAME_MOTION)


def _centroid(obs: Observation) -> np.ndarray:
    ys, xs = np.nonzero(obs.mask())
    return np.array([xs.mean() + obs.box[0], ys.mean() + obs.box[1]])


def _centre(box: Box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


class ObjectTracker:
    """Tracks of the objects of the chosen classes over a clip (see the module's docstring)."""

    def __init__(self, class_indices: list[int], class_names: list[str], min_area: int = 64,
                 max_gap: int = DEFAULT_MAX_GAP) -> None:
        self.classes = sorted(set(class_indices))
        self.class_names = list(class_names)
        self.min_area = check_min_area(min_area)
        self.max_gap = check_max_gap(max_gap)
        self.size: tuple[int, int] | None = None
        self.frames = 0
        self._live: list[_Live] = []
        self._done: list[_Live] = []
        self._next_id = 1
        self._image: np.ndarray | None = None  # the frame being taken

    def push(self, labels: torch.Tensor | np.ndarray, probs: torch.Tensor | None = None,
             flow: Flow | None = None, image: np.ndarray | None = None) -> list[tuple[int, Observation]]:
        """Take the next frame's label map [H, W] (its class probabilities [C, H, W] for the confidences, the flow
        from the previous frame, None on the first, and the frame itself, RGB uint8, whose colours decide which of
        two merged objects a pixel shows); return its objects as (track id, observation) by id."""
        lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if self.size is None:
            self.size = lab.shape
        elif lab.shape != self.size:
            raise ValueError(f"frame {self.frames} is {lab.shape[1]}x{lab.shape[0]}, the clip's first frame "
                             f"{self.size[1]}x{self.size[0]}: a clip's frames must have one size")
        if flow is not None and tuple(flow.size) != lab.shape:
            raise ValueError(f"the flow is {flow.size[1]}x{flow.size[0]}, frame {self.frames} {lab.shape[1]}x"
                             f"{lab.shape[0]}: give the flow between this clip's frames")
        if image is not None and image.shape[:2] != lab.shape:
            raise ValueError(f"frame {self.frames} is {image.shape[1]}x{image.shape[0]}, its labels {lab.shape[1]}x"
                             f"{lab.shape[0]}: give the segmented frame")
        self._image = image
        frame = self.frames
        dets = find_instances(lab, self.classes, self.class_names, self.min_area, probs, frame=frame)
        preds = {id(t): self._predict(t, flow) for t in self._live}
        pieces, hidden = self._assign(dets, preds)
        out = []
        for t in list(self._live):
            if id(t) in pieces:
                got = pieces[id(t)]
                obs = self._observation(frame, [(dets[j], part) for j, part in got], probs)
                self._update(t, obs, all(part is None for _, part in got), len(got) > 1)
                out.append((t.id, obs))
                continue
            t.missed += 1
            t.last_whole = t.last_whole and id(t) not in hidden
            if t.missed > self.max_gap:
                self._live.remove(t)
                self._done.append(t)
        taken = {j for got in pieces.values() for j, _ in got}
        for j, det in enumerate(dets):
            if j not in taken:
                t = _Live(self._next_id, det.class_index, det.class_name)
                self._next_id += 1
                self._live.append(t)
                obs = Observation.of(frame, det.box, det.mask, det.confidence)
                self._update(t, obs, True, False)
                out.append((t.id, obs))
        self.frames += 1
        self._image = None
        return sorted(out, key=lambda pair: pair[0])

    def result(self) -> TrackedObjects:
        """The tracks so far (a snapshot: later frames do not change it)."""
        every = sorted(self._done + self._live, key=lambda t: t.id)
        tracks = tuple(Track(t.id, t.class_index, t.class_name, tuple(t.observations)) for t in every)
        return TrackedObjects(tracks, self.frames, tuple(self.size) if self.size else (0, 0))

    # -- prediction ------------------------------------------------------------------------------------------------

    def _predict(self, t: _Live, flow: Flow | None) -> _Prediction | None:
        """Where `t` should be in this frame (None when its prediction left the frame)."""
        h, w = self.size
        dense = None
        if t.missed == 0 and flow is not None:
            dense = self._carry(t.last, flow)
        coast = self._coast(t)
        parts = [p for p in (dense, coast) if p is not None]
        if not parts:
            return None
        box = _union(*(p[0] for p in parts))
        return _Prediction(box, paste(box, *dense) if dense is not None else None,
                           paste(box, *coast) if coast is not None else None)

    def _carry(self, last: Observation, flow: Flow) -> tuple[Box, np.ndarray] | None:
        """The last mask carried along the flow: its box moved by its pixels' motion (with a margin), then sampled
        back through the flow."""
        h, w = self.size
        mask = last.mask()
        ys, xs = np.nonzero(mask)
        step = max(1, len(xs) // MOTION_SAMPLES)
        xs, ys = xs[::step] + last.box[0], ys[::step] + last.box[1]
        moved = np.stack([xs, ys], axis=1) + flow.motion_at(xs, ys)
        margin = 2 + 0.1 * max(last.box[2] - last.box[0], last.box[3] - last.box[1])
        x1, y1 = np.floor(moved.min(axis=0) - margin).astype(int)
        x2, y2 = np.ceil(moved.max(axis=0) + margin).astype(int) + 1
        box = (max(0, int(x1)), max(0, int(y1)), min(w, int(x2)), min(h, int(y2)))
        if box[0] >= box[2] or box[1] >= box[3]:
            return None
        return box, warp_crop(mask, last.box[:2], flow, box)

    def _coasted_box(self, t: _Live) -> Box:
        """The template's box moved by the track's velocity over the frames since it was seen whole."""
        dx, dy = np.rint(t.velocity * (self.frames - t.template.frame)).astype(int)
        x1, y1, x2, y2 = t.template.box
        return (x1 + int(dx), y1 + int(dy), x2 + int(dx), y2 + int(dy))

    def _coast(self, t: _Live) -> tuple[Box, np.ndarray] | None:
        """The template moved by the track's velocity, cut to the frame (None when it left the frame)."""
        h, w = self.size
        moved = self._coasted_box(t)
        box = (max(0, moved[0]), max(0, moved[1]), min(w, moved[2]), min(h, moved[3]))
        if box[0] >= box[2] or box[1] >= box[3]:
            return None
        return box, paste(box, moved, t.template.mask())

    # -- assignment ------------------------------------------------------------------------------------------------

    def _assign(self, dets: list[Instance], preds: dict[int, _Prediction | None]
                ) -> tuple[dict[int, list[tuple[int, np.ndarray | None]]], set[int]]:
        """Per track (by id()), its pieces: (object index, None) for a whole object, (object index, mask in the
        object's box) for its share of a merged one; and the tracks hidden inside a merged object (no share)."""
        live = [t for t in self._live if preds[id(t)] is not None]
        overlap, fit, cover = {}, {}, {}
        for t in live:
            p = preds[id(t)]
            pm, hyps = p.mask, p.hypotheses
            for j, d in enumerate(dets):
                if d.class_index == t.class_index and _meet(d.box, p.box):
                    o = int((paste(d.box, p.box, pm) & d.mask).sum())
                    if o:
                        inside = [paste(d.box, p.box, h) & d.mask for h in hyps]
                        overlap[id(t), j] = (o, int(pm.sum()), d.area)
                        fit[id(t), j] = max(_fit(i, h, d.area) for i, h in zip(inside, hyps))
                        cover[id(t), j] = max(int(i.sum()) / max(int(h.sum()), 1) for i, h in zip(inside, hyps))
        owner: dict[int, int] = {}  # object -> track
        for (tid, j), score in sorted(fit.items(), key=lambda kv: -kv[1]):
            if score > 0 and tid not in owner.values() and j not in owner:
                owner[j] = tid
        sharers: dict[int, list[int]] = {j: [tid] for j, tid in owner.items()}
        by_id = {id(t): t for t in live}
        for t in live:
            if id(t) in owner.values() or not (t.missed == 0 or not t.last_whole):
                continue
            cands = [(c, j) for (tid, j), c in cover.items() if tid == id(t) and j in owner]
            if not cands or max(cands)[0] < SHARE_COVER:
                continue
            j = max(cands)[1]
            if t.shared_run >= self.max_gap and _same_motion(t, by_id[owner[j]]):
                continue  # one object that had come apart
            sharers[j].append(id(t))
        pieces: dict[int, list[tuple[int, np.ndarray | None]]] = {}
        hidden: set[int] = set()
        for j, tids in sharers.items():
            if len(tids) == 1:
                pieces[tids[0]] = [(j, None)]
                continue
            parts = self._split(dets[j], [by_id[tid] for tid in tids], [preds[tid] for tid in tids])
            pieces.update({tid: [(j, part)] for tid, part in parts.items()})
            hidden.update(tid for tid in tids if tid not in parts)
        split_ok = {id(t) for t in live if t.split_run < self.max_gap}
        for (tid, j), (o, _pa, da) in sorted(overlap.items(), key=lambda kv: -kv[1][0]):
            if j not in owner and tid in pieces and tid in split_ok and o >= 0.5 * da:
                pieces[tid].append((j, None))  # a fragment (an occluder cuts the object in two)
                owner[j] = tid
        self._refind(dets, [t for t in self._live if id(t) not in pieces and id(t) not in hidden], pieces)
        return pieces, hidden

    def _split(self, det: Instance, tracks: list[_Live], preds: list[_Prediction]) -> dict[int, np.ndarray]:
        """A merged object's pixels shared out (see the module's docstring); parts under min_area go to the
        largest part. Tracks left with nothing are not in the result."""
        canvas = _union(det.box, *(p.box for p in preds))
        scores = np.stack([paste(canvas, p.box, p.score()) for p in preds])
        owner = scores.argmax(axis=0)
        unowned = scores.max(axis=0) == 0
        if unowned.any():
            dist = np.stack([cv2.distanceTransform((~paste(canvas, p.box, p.mask)).astype(np.uint8), cv2.DIST_L2, 3)
                             for p in preds])
            owner = np.where(unowned, dist.argmin(axis=0), owner)
        if self._image is not None and all(t.look is not None for t in tracks):
            cost = np.stack([self._look_cost(t, canvas) for t in tracks])
            owner = np.where(np.isfinite(cost.min(axis=0)), cost.argmin(axis=0), owner)
        owner = paste(det.box, canvas, owner.astype(np.int32), -1)
        parts = {id(t): det.mask & (owner == i) for i, t in enumerate(tracks)}
        largest = max(parts, key=lambda tid: parts[tid].sum())
        for tid in list(parts):
            if tid != largest and parts[tid].sum() < self.min_area:
                parts[largest] |= parts.pop(tid)
        return parts

    def _look_cost(self, t: _Live, canvas: Box) -> np.ndarray:
        """Per pixel of `canvas`, how far the frame's colours are from the track's looks where its coasting mask
        lies, aligned where they match best near there (mean absolute difference over 5x5 pixels), infinite
        elsewhere."""
        moved = self._aligned(t, self._coasted_box(t))
        inside = paste(canvas, moved, t.template.mask())
        look = paste(canvas, moved, t.look).astype(np.float32)
        x1, y1, x2, y2 = canvas
        diff = np.abs(self._image[y1:y2, x1:x2].astype(np.float32) - look).sum(axis=2) * inside
        weight = cv2.blur(inside.astype(np.float32), (5, 5))
        mean = cv2.blur(diff, (5, 5)) / np.maximum(weight, 1e-6)
        return np.where(inside, mean, np.inf)

    def _aligned(self, t: _Live, box: Box) -> Box:
        """`box` (the track's looks placed there) moved by up to ALIGN pixels to where the looks match the frame
        best (masked squared difference): coasting drifts a little over a few frames."""
        h, w = self.size
        x1, y1, x2, y2 = box
        sx1, sy1, sx2, sy2 = x1 - ALIGN, y1 - ALIGN, x2 + ALIGN, y2 + ALIGN
        if sx1 < 0 or sy1 < 0 or sx2 > w or sy2 > h:
            return box  # (near the frame's edge: left as it is)
        mask = t.template.mask().astype(np.uint8)
        ssd = cv2.matchTemplate(self._image[sy1:sy2, sx1:sx2], t.look, cv2.TM_SQDIFF, mask=mask)
        dy, dx = np.unravel_index(int(np.argmin(ssd)), ssd.shape)
        return (x1 + int(dx) - ALIGN, y1 + int(dy) - ALIGN, x2 + int(dx) - ALIGN, y2 + int(dy) - ALIGN)

    def _refind(self, dets: list[Instance], lost: list[_Live], pieces: dict) -> None:
        """Objects left over taken by unpaired tracks of their class that should be near them: tracks missed for a
        while, or seen in the last frame but predicted nowhere near (an object coming back into view against its
        old velocity, where the flow at the frame's edge vouches for none of its pixels)."""
        h, w = self.size
        taken = {j for got in pieces.values() for j, _ in got}
        pairs = []
        for t in lost:
            scale = np.sqrt(max(o.area for o in t.observations))
            reach = 2 * scale + np.hypot(*t.velocity) * (t.missed + 1)
            coasted = np.clip(_centre(self._coasted_box(t)), 0, [w - 1, h - 1])
            for j, d in enumerate(dets):
                if j not in taken and d.class_index == t.class_index:
                    c = _centre(d.box)
                    dist = min(np.hypot(*(c - coasted)), np.hypot(*(c - _centre(t.last.box))))
                    if dist <= reach:
                        pairs.append((dist / scale, t.id, j, t))
        for _cost, _tid, j, t in sorted(pairs, key=lambda p: p[:2]):
            if j not in taken and id(t) not in pieces:
                pieces[id(t)] = [(j, None)]
                taken.add(j)

    # -- update ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _observation(frame: int, got: list[tuple[Instance, np.ndarray | None]], probs: torch.Tensor | None
                     ) -> Observation:
        """A track's observation from its pieces: whole objects and shares (masks in their object's box) of
        merged ones; its confidence is the mean class probability over its pixels."""
        if len(got) == 1 and got[0][1] is None:
            det = got[0][0]
            return Observation.of(frame, det.box, det.mask, det.confidence)
        box = _union(*(det.box for det, _ in got))
        mask = np.zeros((box[3] - box[1], box[2] - box[0]), dtype=bool)
        for det, part in got:
            mask |= paste(box, det.box, det.mask if part is None else part)
        box, mask = _tight(mask, box[:2])
        conf = 1.0
        if probs is not None:
            k = got[0][0].class_index
            conf = float(probs[k, box[1]:box[3], box[0]:box[2]].float().cpu().numpy()[mask].mean())
        return Observation.of(frame, box, mask, conf)

    def _update(self, t: _Live, obs: Observation, whole: bool, split: bool) -> None:
        """Record `obs` and update the track's velocity: its centre's move from the previous frame, where it was
        whole too, while its area holds (within STILL: an occluder or the frame's edge cutting into it would move
        its centre; the flow, which occluders do not bend, underestimates small fast objects)."""
        centre = _centroid(obs)
        if whole and t.last is not None and t.missed == 0 and t.last_whole \
                and abs(obs.area - t.last.area) <= STILL * t.last.area:
            v = centre - t.centre
            t.velocity = v if not t.moved else 0.5 * (t.velocity + v)
            t.moved = True
        t.centre = centre
        t.observations.append(obs)
        t.last, t.last_whole, t.missed = obs, whole, 0
        t.shared_run = 0 if whole else t.shared_run + 1
        t.split_run = t.split_run + 1 if split else 0
        if whole:
            t.areas = [(f, a) for f, a in t.areas if f >= obs.frame - self.max_gap] + [(obs.frame, obs.area)]
            if (t.template is None or obs.area >= CUT * max(a for _, a in t.areas)
                    or obs.frame - t.template.frame > 2 * self.max_gap + 1):
                t.template = obs
                x1, y1, x2, y2 = obs.box
                t.look = self._image[y1:y2, x1:x2].copy() if self._image is not None else None
