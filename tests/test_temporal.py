"""Optical flow (trident_core.flow) against known motions, and temporal smoothing (trident_core.temporal) against
the blend written out here: strength 0 untouched, frame 0 unchanged, occluded pixels from the current frame, labels
as classify derives them, its lag, and less flicker on a noisy clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from video_scenes import photo

from trident_core.classes import UNLABELED, parse_classes
from trident_core.classify import Segmentation
from trident_core.compact import compact
from trident_core.flow import Flow, FlowStream, estimate_flow, warp_crop, warp_labels, warp_maps
from trident_core.temporal import FlickerMeter, TemporalSmoother, check_strength, label_flicker


def shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`image` moved dx pixels right and dy down (what enters is the edge repeated)."""
    h, w = image.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return image[ys][:, xs]


def translation_flow(size: tuple[int, int], dx: float, dy: float) -> Flow:
    """The exact flow of a translation by (dx, dy): each pixel came from (x - dx, y - dy), visible where that is in
    view."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    src = np.dstack([xs - dx, ys - dy]).astype(np.float32)
    visible = (src[..., 0] >= 0) & (src[..., 0] <= w - 1) & (src[..., 1] >= 0) & (src[..., 1] <= h - 1)
    forward = np.broadcast_to(np.float32([dx, dy]), (h, w, 2)).copy()
    return Flow(src, visible, forward, 1.0)


def segmentation(probs: np.ndarray, classes, prob_thd: float = 0.0) -> Segmentation:
    """A classification's segmentation of given probabilities [C, H, W] (labels: argmax, threshold as classify)."""
    p = torch.from_numpy(probs.astype(np.float32))
    best, lab = p.max(dim=0)
    low = 0 if classes.has_background else UNLABELED
    lab = torch.where(best < prob_thd, torch.full_like(lab, low), lab)
    return Segmentation(lab, p, torch.zeros(len(classes.queries), 2, 2), classes, tuple(probs.shape[1:]))


# -- flow --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dx,dy", [(3, -2), (-5, 4)])
def test_flow_of_a_known_translation(dx, dy):
    prev = photo(120, 160)
    flow = estimate_flow(prev, shifted(prev, dx, dy))
    h, w = flow.size
    ys, xs = np.mgrid[0:h, 0:w]
    inner = (slice(12, h - 12), slice(12, w - 12))
    err = np.hypot(flow.source[..., 0] - (xs - dx), flow.source[..., 1] - (ys - dy))[inner]
    assert np.mean(err < 0.5) > 0.95
    assert flow.visible[inner].mean() > 0.95
    entered = (slice(None), slice(0, dx)) if dx > 0 else (slice(None), slice(w + dx, w))
    assert not flow.visible[entered].any()  # what came into view has no past
    fwd = flow.motion_at(xs[inner].ravel(), ys[inner].ravel())
    assert np.mean(np.hypot(fwd[:, 0] - dx, fwd[:, 1] - dy) < 0.5) > 0.95


def test_flow_of_a_large_frame_is_estimated_smaller_and_scaled_back():
    prev = photo(540, 720)
    flow = estimate_flow(prev, shifted(prev, 8, 0), max_side=360)
    assert flow.size == (540, 720) and flow.forward.shape[:2] == (270, 360)
    ys, xs = np.mgrid[0:540, 0:720]
    inner = (slice(40, -40), slice(40, -40))
    assert np.mean(np.abs(flow.source[..., 0] - (xs - 8))[inner] < 1.0) > 0.9


@pytest.mark.parametrize("h,w", [(4, 64), (8, 600), (16, 2000), (2000, 16), (1, 1)])
def test_thin_frames_have_a_flow(h, w):
    """DIS refuses frames under 12 pixels on a side (a cv2.error after the models had loaded, for strips and
    banners): they are padded for the flow, which keeps the frames' size."""
    prev = photo(max(h, 2), max(w, 2))[:h, :w]
    flow = estimate_flow(prev, shifted(prev, 1, 0))
    assert flow.size == (h, w) and flow.visible.shape == (h, w)


def test_a_thin_strips_flow_is_its_motion():
    prev = photo(20, 300)
    flow = estimate_flow(prev, shifted(prev, 3, 0))
    ys, xs = np.mgrid[0:20, 0:300]
    inner = (slice(4, 16), slice(12, 288))
    assert np.mean(np.abs(flow.source[..., 0] - (xs - 3))[inner] < 0.5) > 0.9


def test_flow_stream_and_size_check():
    stream = FlowStream()
    a = photo(48, 64)
    assert stream.push(a) is None
    assert stream.push(shifted(a, 1, 0)).size == (48, 64)
    with pytest.raises(ValueError, match="different sizes"):
        estimate_flow(a, photo(40, 64))


def test_warps_equal_an_integer_shift_and_bilinear_interpolation():
    rng = np.random.default_rng(0)
    prev = rng.random((20, 30, 6)).astype(np.float32)
    flow = translation_flow((20, 30), 2, 1)
    got = warp_maps(prev, flow)
    assert np.allclose(got[1:, 2:], prev[:-1, :-2], atol=1e-6)
    half = warp_maps(prev, translation_flow((20, 30), 0.5, 0))
    assert np.allclose(half[:, 1:], (prev[:, :-1] + prev[:, 1:]) / 2, atol=1e-5)
    labels = rng.integers(0, 5, (20, 30))
    assert np.array_equal(warp_labels(labels, flow)[1:, 2:], labels[:-1, :-2])
    mask = np.zeros((20, 30), bool)
    mask[5:9, 4:10] = True
    carried = warp_crop(mask[5:9, 4:10], (4, 5), flow, (0, 0, 30, 20))
    assert np.array_equal(carried >= 0.5, shifted(mask, 2, 1) & flow.visible)


# -- smoothing ---------------------------------------------------------------------------------------------------


def noisy_clip(frames: int, seed: int = 0, noise: float = 0.35):
    """A panning photo's frames, a two-class truth (left / right of a line that moves with the image) and per-frame
    class probabilities: the truth blurred plus independent noise, so labels near ties flip from frame to frame."""
    rng = np.random.default_rng(seed)
    world = photo(72, 96 + 2 * frames, seed)
    images, probs = [], []
    for k in range(frames):
        images.append(np.ascontiguousarray(world[:, 2 * frames - 2 * k:2 * frames - 2 * k + 96]))
        xs = np.arange(96)[None, :] + 2 * frames - 2 * k
        p1 = np.clip(0.5 + (xs - (48 + 2 * frames)) / 60 + noise * rng.standard_normal((72, 96)), 0, 1)
        probs.append(np.stack([1 - p1, p1]).astype(np.float32))
    return images, probs


def test_strength_zero_returns_every_segmentation_itself():
    classes = parse_classes("a, b")
    images, probs = noisy_clip(4)
    sm, stream = TemporalSmoother(0, 0.0), FlowStream()
    for img, p in zip(images, probs):
        seg = segmentation(p, classes)
        assert sm(seg, stream.push(img)) is seg


def test_blend_formula_occlusion_and_labels():
    classes = parse_classes("a, b, c", background="sky")
    rng = np.random.default_rng(1)
    p0, p1 = (rng.dirichlet(np.ones(4), (16, 20)).transpose(2, 0, 1).astype(np.float32) for _ in range(2))
    flow = translation_flow((16, 20), 1, 0)
    flow.visible[4:8, 6:12] = False  # occluded
    s, thd = 0.6, 0.4
    sm = TemporalSmoother(s, thd)
    seg0 = segmentation(p0, classes, thd)
    assert sm(seg0, None) is seg0  # frame 0 unchanged
    out = sm(segmentation(p1, classes, thd), flow)
    want = p1.copy()
    for y in range(16):
        for x in range(1, 20):
            if flow.visible[y, x]:
                want[:, y, x] = (1 - s) * p1[:, y, x] + s * p0[:, y, x - 1]
    assert np.allclose(out.probs.numpy(), want, atol=1e-6)
    best, arg = want.max(axis=0), want.argmax(axis=0)
    assert np.array_equal(out.labels.numpy(), np.where(best < thd, 0, arg))
    assert out.labels.dtype == torch.int64 and out.info["temporal_strength"] == s


def test_a_compact_segmentation_is_smoothed_alike():
    classes = parse_classes("a, b")
    images, probs = noisy_clip(3)
    plain, packed, stream = TemporalSmoother(0.5, 0.0), TemporalSmoother(0.5, 0.0), FlowStream()
    for img, p in zip(images, probs):
        flow = stream.push(img)
        seg = segmentation(p, classes)
        a = plain(seg, flow)
        b = packed(compact(seg, 40.0, 0.0), flow)
    assert torch.equal(a.labels.long(), b.labels.long())


@pytest.mark.parametrize("s", [0.5, 0.8])
def test_lag_of_a_complete_swap(s):
    """A pixel whose class swaps for good keeps the old label n - 1 frames, n the smallest with s^n < 1/2."""
    classes = parse_classes("a, b")
    flow = translation_flow((4, 4), 0, 0)
    sm = TemporalSmoother(s, 0.0)
    old, new = np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.float32)
    old[0], new[1] = 1, 1
    sm(segmentation(old, classes), None)
    late = 0
    while sm(segmentation(new, classes), flow).labels[0, 0] == 0:
        late += 1
    n = next(n for n in range(1, 100) if s ** n < 0.5)
    assert late == n - 1


def test_smoothing_cuts_flicker_on_a_noisy_clip():
    classes = parse_classes("a, b")
    images, probs = noisy_clip(12)
    raw, smooth = FlickerMeter(), FlickerMeter()
    sm, stream = TemporalSmoother(0.8, 0.0), FlowStream()
    for img, p in zip(images, probs):
        flow = stream.push(img)
        seg = segmentation(p, classes)
        raw.push(seg.labels.numpy(), flow)
        smooth.push(sm(seg, flow).labels.numpy(), flow)
    assert raw.flicker > 0.1
    assert smooth.flicker < raw.flicker / 3


def test_flicker_counts_changed_visible_pixels():
    flow = translation_flow((10, 12), 2, 0)
    prev = np.arange(120).reshape(10, 12) % 7
    cur = shifted(prev, 2, 0).copy()
    assert label_flicker(prev, cur, flow) == (0, int(flow.visible.sum()))
    cur[3:5, 4:7] += 1
    cur[:, 0] += 1  # entered the view: not compared
    assert label_flicker(prev, cur, flow) == (6, 100)


def test_bad_settings_and_inputs_are_refused():
    for bad in (-0.1, 1.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="strength"):
            check_strength(bad)
    classes = parse_classes("a, b")
    sm = TemporalSmoother(0.5, 0.0)
    _, probs = noisy_clip(2)
    sm(segmentation(probs[0], classes), None)
    with pytest.raises(ValueError, match="needs the flow"):
        sm(segmentation(probs[1], classes), None)
    with pytest.raises(ValueError, match="one size"):
        sm(segmentation(probs[1][:, :10], classes), translation_flow((10, 96), 0, 0))
    with pytest.raises(ValueError, match="the frames smoothing follows are 96x50 pixels, the segmentation 96x72: "
                                         "connect the segmented frames"):  # (it quoted the segmentation's size twice)
        sm(segmentation(probs[1], classes), translation_flow((50, 96), 0, 0))
    seg = segmentation(probs[1], classes)
    refined = Segmentation(seg.labels, seg.probs, seg.grid_logits, classes, seg.image_size, seg.labels, seg.probs)
    with pytest.raises(ValueError, match="before SAM refinement"):
        sm(refined, translation_flow((72, 96), 0, 0))


def test_segment_hands_the_classification_to_the_hook_before_refinement(small_trident):
    """Trident.segment's after_classify sees the classification and what it returns is what SAM refines."""
    from trident_core.config import Params

    image = photo(48, 64)
    seen = []

    def hook(seg):
        seen.append(seg)
        probs = torch.zeros_like(seg.probs)
        probs[1] = 1  # every pixel "b"
        return Segmentation(torch.ones_like(seg.labels), probs, seg.grid_logits, seg.classes, seg.image_size)

    fast = Params().update(paradigm="segment_then_splice", short_side=32)
    out = small_trident.segment(image, "a, b", fast, after_classify=hook)
    assert len(seen) == 1 and not seen[0].refined and (out.labels == 1).all()
    refined = small_trident.segment(image, "a, b", fast.update(refine=True), after_classify=hook)
    assert refined.refined and (refined.labels_coarse == 1).all()
