"""Objects tracked over a clip (trident_core.tracking): synthetic scenes with known ground truth (video_scenes.py)
fed as label maps made from the true masks, so only the tracker is measured: no identity switches, objects found
again after absences up to max_gap; a single frame equals find_instances; compact storage; the preview."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from video_scenes import Scene, Shape, identity_measure, linear, scenes

from trident_core.flow import FlowStream
from trident_core.instances import find_instances
from trident_core.render import render_tracks, track_color
from trident_core.tracking import DEFAULT_MAX_GAP, ObjectTracker, check_max_gap

NAMES = ["background", "one", "two", "pillar"]
MIN_AREA = 20


def track(scene: Scene, max_gap: int = DEFAULT_MAX_GAP, probs: bool = False):
    """The scene's frames, the tracker's result and per frame {id: full mask} as the tracker returned them."""
    frames = scene.render()
    tracker, stream = ObjectTracker([1, 2], NAMES, MIN_AREA, max_gap), FlowStream()
    per_frame = []
    for image, labels, _ in frames:
        p = torch.from_numpy(np.stack([labels == k for k in range(4)]).astype(np.float32) * 0.9) if probs else None
        objects = tracker.push(labels, p, stream.push(image), image)
        masks = {}
        for tid, obs in objects:
            m = np.zeros(labels.shape, bool)
            x1, y1, x2, y2 = obs.box
            m[y1:y2, x1:x2] = obs.mask()
            masks[tid] = m
        per_frame.append(masks)
    return frames, tracker.result(), per_frame


def absences(truth: list[list[np.ndarray]]) -> list[int]:
    """Every run of frames in which a true object was missing between two frames where it was visible."""
    out = []
    for g in range(len(truth[0])):
        seen = [k for k, masks in enumerate(truth) if masks[g].sum() >= MIN_AREA]
        out += [b - a - 1 for a, b in zip(seen, seen[1:]) if b - a > 1]
    return out


@pytest.mark.parametrize("name", ["crossing", "leave_and_return", "pillar", "pan"])
def test_no_identity_switch_and_objects_found_again(name):
    scene = scenes(gap=DEFAULT_MAX_GAP - 1)[name]
    frames, result, per_frame = track(scene)
    truth = [t for *_, t in frames]
    m = identity_measure(truth, per_frame, MIN_AREA)
    assert m["switches"] == 0
    assert m["refound"] == m["returns"]
    assert m["paired"] >= 0.95 * m["visible"]
    gaps = absences(truth)
    if name in ("leave_and_return", "pillar"):
        assert m["returns"] >= 1 and max(gaps) >= DEFAULT_MAX_GAP - 2  # absences near the setting's length
    assert all(g <= DEFAULT_MAX_GAP for g in gaps)
    assert len(result.tracks) == len(scene.shapes)  # one id per object, none made up


@pytest.mark.parametrize("dy,speed,front", [(0, 2, 0), (0, 3, 1), (4, 5, 0), (8, 3, 1)])
def test_two_objects_of_one_class_crossing_keep_their_ids(dy, speed, front):
    h, w, r = 96, 128, 10
    scene = Scene((h, w), (w - 2 * r) // speed + 2, [
        Shape(1, "disc", r, linear((r + 2, h / 2 - dy), (speed, 0)), depth=front, tint=(40, 0, 0)),
        Shape(1, "disc", r, linear((w - r - 2, h / 2 + dy), (-speed, 0)), depth=1 - front, tint=(0, 0, 40))],
        seed=dy + speed)
    frames, result, per_frame = track(scene)
    truth = [t for *_, t in frames]
    assert identity_measure(truth, per_frame, MIN_AREA)["switches"] == 0
    # after the crossing each id is on the object it started on
    for tid, g in ((1, 0), (2, 1)):
        last = per_frame[-1][tid]
        assert (last & truth[-1][g]).sum() > 0.8 * truth[-1][g].sum()


def test_an_absence_longer_than_max_gap_gives_a_new_id():
    scene = scenes(gap=7)["pillar"]
    frames, result, per_frame = track(scene, max_gap=2)
    truth = [t for *_, t in frames]
    assert max(absences(truth)) > 2
    m = identity_measure(truth, per_frame, MIN_AREA)
    assert m["returns"] >= 1 and m["refound"] == 0
    assert len(result.tracks) == len(scene.shapes) + 1


def random_labels(seed: int, size=(40, 56), classes: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.kron(rng.integers(-1, classes, (size[0] // 4, size[1] // 4)), np.ones((4, 4), np.int64))
    speckle = rng.random(size) < 0.08
    lab[speckle] = rng.integers(-1, classes, int(speckle.sum()))
    return lab


@pytest.mark.parametrize("seed", range(3))
def test_a_single_frame_gives_find_instances_objects_in_its_order(seed):
    lab = random_labels(seed)
    probs = torch.from_numpy(np.random.default_rng(seed).random((4, *lab.shape)).astype(np.float32))
    names = ["a", "b", "c", "d"]
    tracker = ObjectTracker([3, 0, 2], names, min_area=3)
    objects = tracker.push(lab, probs)
    want = find_instances(lab, [0, 2, 3], names, 3, probs)
    assert [tid for tid, _ in objects] == list(range(1, len(want) + 1))
    result = tracker.result()
    for (tid, obs), inst, tr in zip(objects, want, result.tracks):
        assert obs.box == inst.box and obs.area == inst.area and obs.confidence == inst.confidence
        assert np.array_equal(obs.mask(), inst.mask)
        assert (tr.id, tr.class_index, tr.class_name) == (tid, inst.class_index, inst.class_name)
        assert np.array_equal(tr.masks(1, lab.shape)[0], inst.full_mask(lab.shape))


def test_results_masks_regions_json_and_compact_storage():
    frames, result, per_frame = track(scenes()["leave_and_return"], probs=True)
    n, size = len(frames), frames[0][1].shape
    assert result.num_frames == n and result.size == size
    for t in result.tracks:
        full = t.masks(n, size)
        assert full.shape == (n, *size) and full.dtype == bool
        for k in range(n):
            assert np.array_equal(full[k], per_frame[k].get(t.id, np.zeros(size, bool)))
        boxes = np.array([o.box for o in t.observations])
        union = boxes[:, :2].min(axis=0).tolist() + boxes[:, 2:].max(axis=0).tolist()
        x1, y1, x2, y2 = region = t.crop_region(size, 2.0)
        assert 0 <= x1 <= union[0] and 0 <= y1 <= union[1] and union[2] <= x2 <= size[1] and union[3] <= y2 <= size[0]
        assert x2 - x1 == min(size[1], round(2.0 * (union[2] - union[0])))
        cut = t.masks(n, size, region)
        assert np.array_equal(cut, full[:, y1:y2, x1:x2]) and not full[:, :y1].any() and not full[:, :, x2:].any()
        for o in t.observations:
            assert o.bits.dtype == np.uint8 and o.bits.nbytes == -(-(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) // 8)
            assert o.area == int(o.mask().sum()) and abs(o.confidence - 0.9) < 1e-6
    tracks = json.loads(result.to_json())
    assert [t["id"] for t in tracks] == list(range(1, len(tracks) + 1))
    firsts = [t["first_frame"] for t in tracks]
    assert firsts == sorted(firsts)
    for t, rec in zip(result.tracks, tracks):
        assert rec["class"] == NAMES[rec["class_index"]] and rec["first_frame"] == t.first_frame
        assert rec["last_frame"] == t.last_frame == rec["frames"][-1]["frame"]
        assert [f["area"] for f in rec["frames"]] == [int(per_frame[f["frame"]][t.id].sum()) for f in rec["frames"]]


def test_the_result_is_a_snapshot():
    frames = scenes()["pan"].render()
    tracker, stream = ObjectTracker([1, 2], NAMES, MIN_AREA), FlowStream()
    for image, labels, _ in frames[:3]:
        tracker.push(labels, None, stream.push(image))
    early = tracker.result()
    lengths = [len(t.observations) for t in early.tracks]
    for image, labels, _ in frames[3:6]:
        tracker.push(labels, None, stream.push(image))
    assert [len(t.observations) for t in early.tracks] == lengths and early.num_frames == 3


def test_preview_colours_each_object_by_its_id():
    frames, result, per_frame = track(scenes()["crossing"])
    image = frames[5][0]
    objects = result.frame_objects(5)
    assert [tid for tid, _ in objects] == sorted(per_frame[5])
    out = render_tracks(image, objects)
    assert out.shape == image.shape and out.dtype == np.uint8
    for tid, obs in objects:
        m = per_frame[5][tid]
        m[obs.box[1]:obs.box[1] + 16] = False  # the id's number is written at the box's top
        want = np.rint(image[m].astype(np.float32) * 0.5 + track_color(tid).astype(np.float32) * 0.5)
        assert np.abs(out[m].astype(int) - want).max() <= 1
    outside = ~np.any([per_frame[5][tid] for tid, _ in objects], axis=0)
    outside[[o.box[1] + y for _, o in objects for y in range(16) if o.box[1] + y < outside.shape[0]]] = False
    assert np.array_equal(out[outside], image[outside])
    assert not np.array_equal(track_color(1), track_color(2))


def test_bad_settings_and_frames_are_refused():
    for bad in (-1, 1.5, True, "3", 10**6):
        with pytest.raises(ValueError, match="max_gap"):
            check_max_gap(bad)
    tracker = ObjectTracker([1], NAMES)
    tracker.push(np.zeros((8, 10), np.int64))
    with pytest.raises(ValueError, match="one size"):
        tracker.push(np.zeros((8, 12), np.int64))
    with pytest.raises(ValueError, match="give the segmented frame"):
        tracker.push(np.zeros((8, 10), np.int64), None, None, np.zeros((8, 11, 3), np.uint8))
    stream = FlowStream()
    stream.push(np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="flow"):
        tracker.push(np.zeros((8, 10), np.int64), None, stream.push(np.zeros((6, 6, 3), np.uint8)))
