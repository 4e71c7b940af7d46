"""The nodes on a batch of video frames: Trident Instances' tracked outputs (per-object masks, the mask batch,
Impact-Pack's video SEGS, the tracks JSON, the preview) on synthetic clips with known objects, measured against the
true masks; and the temporal smoothing of Trident Segment and Classify (off: bit-identical; on: less flicker,
frame 0 as it was)."""

from __future__ import annotations

import importlib
import json
import sys

import cv2
import numpy as np
import pytest
import test_nodes
import torch
from test_frames import reachable_tensor_bytes
from test_nodes import Interrupted, core, fake_comfy, run
from video_scenes import identity_measure, scenes

models, loaded = test_nodes.models, test_nodes.loaded  # the node tests' fixtures

IMPACT_SEG_FIELDS = ("cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                     "control_net_wrapper")
CONFIDENCE = 0.8  # each pixel's own class probability in the hand-made segmentations


def clip_segmentations(name: str, size=(96, 128), gap: int = 6) -> tuple[torch.Tensor, list, list, object]:
    """A synthetic clip (tests/video_scenes.py) as ComfyUI's IMAGE batch, Trident segmentations made from its true
    label maps (0 floor, 1 disc, 2 square, 3 pillar), the true visible masks per frame, and the class list."""
    classify, classes_mod = core("classify"), core("classes")
    cl = classes_mod.parse_classes("disc, square, pillar", background="floor")
    frames = scenes(size, gap)[name].render()
    segs = []
    for _, labels, _ in frames:
        lab = torch.from_numpy(labels)
        probs = torch.nn.functional.one_hot(lab, 4).permute(2, 0, 1).float() * (CONFIDENCE - 0.2 / 3) + 0.2 / 3
        segs.append(classify.Segmentation(lab, probs, torch.zeros(4, 3, 4), cl, size))
    image = torch.from_numpy(np.stack([f[0] for f in frames])).float() / 255
    return image, segs, [f[2] for f in frames], cl


def instances(image, segs, classes="disc, square", min_area=20, crop_factor=2.0, **extra) -> dict:
    names = ("masks", "segs", "objects_json", "count", "object_masks", "mask_batch", "video_segs", "tracks_json",
             "tracked_preview")
    out = run("TridentInstances", segmentation=segs, image=image, classes=classes, min_area=min_area,
              crop_factor=crop_factor, **extra)
    return dict(zip(names, out, strict=True))


def impact_segs_to_mask_batch(segs) -> torch.Tensor:
    """What Impact-Pack's SEGS to Mask Batch makes of SEGS (its segs_to_masklist, written out): per SEG, a canvas
    per frame of its mask with the crop pasted at its crop region, SEG after SEG."""
    (h, w), out = segs
    for seg in out:
        mask = torch.as_tensor(seg.cropped_mask)
        mask = mask[None] if mask.ndim == 2 else mask
        canvas = torch.zeros((len(mask), h, w))
        x1, y1, x2, y2 = seg.crop_region
        canvas[:, y1:y2, x1:x2] = mask
        yield from canvas


def box_of(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("name", ["crossing", "leave_and_return", "pillar", "pan"])
def test_tracked_objects_keep_their_ids_and_every_form_agrees(name):
    """Each true object is one id over the clip (0 switches, every return found with its id); the per-object
    masks, the batch, the JSON, the video SEGS and the preview all describe the same objects."""
    image, segs, truth, cl = clip_segmentations(name)
    out = instances(image, segs)
    n, size = image.shape[0], tuple(image.shape[1:3])
    tracks = json.loads(out["tracks_json"])
    masks = out["object_masks"]
    assert len(tracks) == len(masks) >= 2 and out["mask_batch"].shape == (len(tracks) * n, *size)
    per_frame = [{t["id"]: m[k].numpy() > 0 for t, m in zip(tracks, masks)} for k in range(n)]
    measure = identity_measure(truth, per_frame, min_area=20)
    assert measure["switches"] == 0 and measure["refound"] == measure["returns"]
    assert measure["paired"] >= 0.95 * measure["visible"]
    if name in ("leave_and_return", "pillar"):  # an object leaves the frame / hides behind the pillar
        assert measure["returns"] >= 1

    labels = [s.labels.numpy() for s in segs]
    for i, (t, m) in enumerate(zip(tracks, masks)):
        assert torch.equal(m, out["mask_batch"][i * n:(i + 1) * n])  # object by object
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        seen = [k for k in range(n) if m[k].any()]
        assert [f["frame"] for f in t["frames"]] == seen and (t["first_frame"], t["last_frame"]) == (seen[0], seen[-1])
        k_class = cl.names.index(t["class"])
        for f in t["frames"]:
            mk = m[f["frame"]].numpy() > 0
            assert f["box"] == box_of(mk) and f["area"] == mk.sum()
            assert (labels[f["frame"]][mk] == k_class).all()  # only its class's pixels
            assert f["confidence"] == pytest.approx(CONFIDENCE, abs=1e-5)
    union = np.stack([np.any([m[k].numpy() > 0 for m in masks], axis=0) for k in range(n)])
    assert (union <= np.isin(np.stack(labels), [1, 2])).all()

    (h, w), video_segs = out["video_segs"]
    assert (h, w) == size and len(video_segs) == len(tracks)
    for seg, t in zip(video_segs, tracks):
        assert type(seg)._fields == IMPACT_SEG_FIELDS and seg.cropped_image is None
        assert seg.label == t["class"] and seg.confidence == pytest.approx(CONFIDENCE, abs=1e-5)
        assert isinstance(seg.cropped_mask, torch.Tensor) and seg.cropped_mask.dtype == torch.float32
        boxes = np.array([f["box"] for f in t["frames"]])
        union_box = [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()]
        assert list(seg.bbox) == union_box
        x1, y1, x2, y2 = seg.crop_region
        ux1, uy1, ux2, uy2 = union_box
        assert 0 <= x1 <= ux1 and 0 <= y1 <= uy1 and ux2 <= x2 <= w and uy2 <= y2 <= h
        for side, length, limit in ((x2 - x1, ux2 - ux1, w), (y2 - y1, uy2 - uy1, h)):
            assert side == min(limit, round(2.0 * length))  # crop_factor 2: twice the union's side, inside the image
        assert seg.cropped_mask.shape == (n, y2 - y1, x2 - x1)
    assert torch.equal(torch.stack(list(impact_segs_to_mask_batch(out["video_segs"]))), out["mask_batch"])

    preview = out["tracked_preview"]
    assert preview.shape == (n, *size, 3) and preview.dtype == torch.float32
    frames = (image * 255).round()
    colours = {}
    for t, m in zip(tracks, masks):
        for k in range(n):
            mk = m[k].numpy() > 0
            mk[:, :] &= np.pad(np.ones((h - 8, w - 8), bool), 4)  # away from the frame's edges
            x1, y1 = box_of(m[k].numpy() > 0)[:2] if m[k].any() else (0, 0)
            mk[y1:y1 + 16, x1:x1 + 24] = False  # its id's digits
            if mk.sum() < 10:
                continue
            colour = (2 * (preview[k] * 255).round() - frames[k])[torch.from_numpy(mk)].median(dim=0).values
            colours.setdefault(t["id"], []).append(colour)
    for tid, seen in colours.items():  # one colour per object, in every frame
        assert (torch.stack(seen) - seen[0]).abs().max() <= 2, tid
    firsts = [c[0] for c in colours.values()]
    assert all((a - b).abs().max() > 20 for i, a in enumerate(firsts) for b in firsts[i + 1:])
    far = torch.ones((n, h, w), dtype=torch.bool)  # the frame as it was, away from the objects and their ids
    for t in tracks:
        for f in t["frames"]:
            x1, y1, x2, y2 = f["box"]
            far[f["frame"], max(0, y1 - 2):max(y2, y1 + 20) + 2, max(0, x1 - 2):max(x2, x1 + 30) + 2] = False
    assert far.float().mean() > 0.5 and torch.equal((preview * 255).round()[far], frames[far])


def test_max_gap_decides_whether_a_returning_object_keeps_its_id():
    """The disc leaves the frame for `gap` frames: with max_gap at least that long it comes back with its id, with a
    shorter one it comes back as a new object."""
    image, segs, truth, _ = clip_segmentations("leave_and_return", gap=6)
    absent = [k for k in range(len(truth)) if truth[k][0].sum() < 20]
    assert 4 <= len(absent) <= 8

    def ids_of_the_disc(max_gap: int) -> set[int]:
        out = instances(image, segs, max_gap=max_gap)
        tracks = json.loads(out["tracks_json"])
        return {t["id"] for t, m in zip(tracks, out["object_masks"]) for k in range(len(truth))
                if truth[k][0].sum() >= 20 and (m[k].numpy() > 0)[truth[k][0]].mean() > 0.5}

    assert len(ids_of_the_disc(8)) == 1
    assert len(ids_of_the_disc(2)) == 2
    with pytest.raises(ValueError, match="max_gap"):
        instances(image, segs, max_gap=-1)


def test_a_single_image_behaves_as_before_and_tracking_leaves_the_per_frame_outputs_alone():
    """One frame: the per-frame outputs are those of an untracked run, and the tracked outputs hold the same
    objects (one frame each, same order, same crop regions); on a batch too the per-frame outputs do not depend
    on tracking."""
    image, segs, _, _ = clip_segmentations("crossing")
    one = instances(image[:1], segs[:1])
    untracked = instances(image[:1], segs[:1], track_objects=False)
    for key in ("masks", "objects_json", "count"):
        assert torch.equal(one[key], untracked[key]) if key == "masks" else one[key] == untracked[key]
    count = one["count"]
    assert count >= 3 and len(one["object_masks"]) == count == one["mask_batch"].shape[0]
    for mask, old, obj, seg, vseg, t in zip(one["object_masks"], one["masks"], json.loads(one["objects_json"]),
                                            one["segs"][1], one["video_segs"][1], json.loads(one["tracks_json"])):
        assert mask.shape[0] == 1 and torch.equal(mask[0], old)
        assert t["frames"][0]["box"] == obj["box"] and t["class"] == obj["class"]
        assert vseg.crop_region == seg.crop_region and np.array_equal(vseg.cropped_mask[0].numpy(), seg.cropped_mask)
    assert [t["id"] for t in json.loads(one["tracks_json"])] == list(range(1, count + 1))

    tracked, plain = instances(image[:6], segs[:6]), instances(image[:6], segs[:6], track_objects=False)
    assert torch.equal(tracked["masks"], plain["masks"]) and tracked["objects_json"] == plain["objects_json"]
    assert len(plain["object_masks"]) == 1 and not plain["object_masks"][0].any()
    assert plain["mask_batch"].shape == (6, 96, 128) and not plain["mask_batch"].any()
    assert plain["video_segs"] == ((96, 128), []) and json.loads(plain["tracks_json"]) == []
    assert torch.equal((plain["tracked_preview"] * 255).round(), (image[:6] * 255).round())


def test_max_objects_keeps_the_tracks_covering_the_most_pixels(caplog):
    """Tracked: at most max_objects objects over the clip, those with the largest total area, ids kept."""
    image, segs, _, _ = clip_segmentations("crossing")
    every = json.loads(instances(image, segs)["tracks_json"])
    assert len(every) >= 3
    total = {t["id"]: sum(f["area"] for f in t["frames"]) for t in every}
    want = sorted(sorted(total, key=lambda i: (-total[i], i))[:2])
    with caplog.at_level("WARNING"):
        out = instances(image, segs, max_objects=2)
    assert [t["id"] for t in json.loads(out["tracks_json"])] == want
    assert f"dropped {len(every) - 2}" in caplog.text
    assert len(out["object_masks"]) == 2 and len(out["video_segs"][1]) == 2


def test_instances_show_progress_per_frame_and_stop_on_cancel(monkeypatch, tmp_path):
    image, segs, _, _ = clip_segmentations("pan")
    fake = fake_comfy({}, tmp_path)
    for name, module in fake["modules"].items():
        monkeypatch.setitem(sys.modules, name, module)
    instances(image[:5], segs[:5])
    assert fake["log"]["bars"][-1].total == 5 and fake["log"]["bars"][-1].current == 5
    cancel = fake_comfy({}, tmp_path, interrupt_after=3)
    monkeypatch.setitem(sys.modules, "comfy.model_management", cancel["modules"]["comfy.model_management"])
    with pytest.raises(Interrupted):
        instances(image, segs)
    assert cancel["log"]["checks"] == 4


def test_frames_segmented_with_other_classes_are_refused():
    image, segs, _, _ = clip_segmentations("pan")
    other = core("classes").parse_classes("disc, square, wall", background="floor")
    bad = [*segs[:2], core("classify").Segmentation(segs[2].labels, segs[2].probs, segs[2].grid_logits, other,
                                                    (96, 128))]
    with pytest.raises(ValueError, match="other classes than frame 0"):
        instances(image[:3], bad)


def test_tracked_mask_list_shares_the_batch_and_holds_no_tracker_state():
    """The per-object masks are views of the mask batch (no second copy); every tensor the node returns is an
    output the user asked for: the per-frame masks and crops, the mask batch, the video SEGS' masks, the preview."""
    image, segs, _, _ = clip_segmentations("crossing")
    out = instances(image, segs)
    batch = out["mask_batch"]
    assert all(m.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr() for m in out["object_masks"])
    video_masks = sum(s.cropped_mask.numel() for s in out["video_segs"][1]) * 4
    still = sum(s.cropped_image.numel() * 4 + s.cropped_mask.nbytes for s in out["segs"][1])
    want = out["masks"].numel() * 4 + still + batch.numel() * 4 + video_masks + out["tracked_preview"].numel() * 4
    assert reachable_tensor_bytes(out) == want


# -- temporal smoothing ------------------------------------------------------------------------------------------

def smooth_segment(loaded, image, strength=None, refine=False):
    clip, dino, sam = loaded
    extra = {} if strength is None else {"temporal_smoothing": strength}
    return run("TridentSegment", image=image, clip=clip, dino=dino, sam=sam, classes="sky, person, grass",
               preset="default", refine=refine, sam_tiles="preset", **extra)[0]


def test_segment_smoothing_off_is_todays_output_and_on_blends_along_the_flow(loaded):
    """Strength 0 gives the segmentations of a run without the input, bit for bit; strength s leaves frame 0 as it
    is and gives frame 1 (1 - s) p1 + s p0 carried along the flow where the flow sees the pixel in both frames,
    p1 elsewhere (the blend written out with OpenCV's remap); with refinement, SAM refines the smoothed map."""
    image = clip_segmentations("pan", size=(64, 86))[0][:3]
    plain, off = smooth_segment(loaded, image), smooth_segment(loaded, image, 0.0)
    for a, b in zip(plain, off):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.probs, b.probs)
    on = smooth_segment(loaded, image, 0.8)
    assert torch.equal(on[0].labels, plain[0].labels) and torch.equal(on[0].probs, plain[0].probs)
    frames = (image * 255).round().byte().numpy()
    flow = core("flow").estimate_flow(frames[0], frames[1])
    p0, p1 = (plain[k].probs.permute(1, 2, 0).numpy() for k in (0, 1))
    carried = np.dstack([cv2.remap(np.ascontiguousarray(p0[..., c]), flow.source[..., 0], flow.source[..., 1],
                                   cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for c in range(p0.shape[2])])
    want = np.where(flow.visible[..., None], 0.2 * p1 + 0.8 * carried, p1)
    assert flow.visible.mean() > 0.5
    assert np.abs(on[1].probs.permute(1, 2, 0).numpy() - want).max() < 2e-3  # stored in float16
    top2 = np.sort(want, axis=2)[..., -2:]
    sure = torch.from_numpy(top2[..., 1] - top2[..., 0] > 1e-2)
    assert torch.equal(on[1].labels[sure].long(), torch.from_numpy(want.argmax(2))[sure])
    assert not torch.equal(on[1].probs, plain[1].probs)
    refined = smooth_segment(loaded, image[:2], 0.8, refine=True)
    assert torch.equal(refined[1].labels_coarse.long(), on[1].labels.long()) and refined[1].refined


def noisy_feature_maps(truth: list[np.ndarray], size: tuple[int, int], seed: int = 0) -> list:
    """Feature maps [E, h, w] (8-pixel tokens) whose tokens point at their true class (the label at the token's
    centre) plus noise drawn anew for every frame: labels that flicker where the noise wins."""
    rng = np.random.default_rng(seed)
    aggregation = core("aggregation")
    maps = []
    for labels in truth:
        grid = labels[4::8, 4::8]
        feats = np.eye(6, dtype=np.float32)[grid].transpose(2, 0, 1) + rng.normal(0, 0.45, (6, *grid.shape))
        maps.append(aggregation.FeatureMap(torch.from_numpy(feats.astype(np.float32)), size, "splice_then_segment",
                                           "affinity", (1, 1)))
    return maps


def test_classify_smoothing_reduces_flicker_and_keeps_frame_0():
    """A synthetic clip classified from noisy features: at strength 0 the node's output is the per-frame
    classification; at 0.8 the share of pixels whose label changes along the flow falls below half, frame 0's
    labels stay, and the labels agree better with the truth."""
    image, segs, _, cl = clip_segmentations("pan")
    truth = [s.labels.numpy() for s in segs]
    maps = noisy_feature_maps(truth, (96, 128))
    sockets = importlib.import_module(f"{test_nodes.import_pack().__name__}.nodes.sockets")
    text = sockets.EncodedClasses(cl, torch.eye(6)[:4])  # class k's text points at feature axis k

    def classify(strength, **extra):
        return run("TridentClassify", feature_map=maps, classes=text, logit_scale=40.0, prob_thd=0.0, image=image,
                   temporal_smoothing=strength, **extra)[0]

    plain, smooth = classify(0.0), classify(0.8)
    default = run("TridentClassify", feature_map=maps, classes=text, logit_scale=40.0, prob_thd=0.0)[0]
    assert all(torch.equal(a.labels, b.labels) and torch.equal(a.probs, b.probs) for a, b in zip(plain, default))
    assert torch.equal(smooth[0].labels, plain[0].labels)
    frames = (image * 255).round().byte().numpy()

    def flicker(segmentation) -> float:
        meter, flows = core("temporal").FlickerMeter(), core("flow").FlowStream()
        for frame, seg in zip(frames, segmentation):
            meter.push(seg.labels.numpy(), flows.push(frame))
        return meter.flicker

    def error(segmentation) -> float:
        return float(np.mean([(s.labels.numpy() != t).mean() for s, t in zip(segmentation, truth)]))

    assert flicker(plain) > 0.05 and flicker(smooth) < 0.5 * flicker(plain)
    assert error(smooth) < error(plain)
    with pytest.raises(ValueError, match="temporal smoothing needs the image"):
        run("TridentClassify", feature_map=maps, classes=text, logit_scale=40.0, prob_thd=0.0, temporal_smoothing=0.5)
