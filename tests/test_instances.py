"""Objects out of label maps (trident_core.instances and the Trident Instances node), checked against a plain
flood fill written here and against Impact-Pack's SEGS layout."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
import torch
from test_nodes import core, run

IMPACT_SEG_FIELDS = ("cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                     "control_net_wrapper")


def flood_fill_objects(labels: np.ndarray, classes: list[int], min_area: int) -> list[tuple[int, np.ndarray]]:
    """(class, mask) of every 8-connected region, classes ascending, regions in reading order of their first
    pixel, by scanning the pixels and growing a region from each unvisited one."""
    h, w = labels.shape
    out = []
    for k in sorted(classes):
        seen = np.zeros((h, w), bool)
        for y in range(h):
            for x in range(w):
                if labels[y, x] != k or seen[y, x]:
                    continue
                mask = np.zeros((h, w), bool)
                todo = deque([(y, x)])
                seen[y, x] = True
                while todo:
                    cy, cx = todo.popleft()
                    mask[cy, cx] = True
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and labels[ny, nx] == k:
                                seen[ny, nx] = True
                                todo.append((ny, nx))
                if mask.sum() >= min_area:
                    out.append((k, mask))
    return out


def random_labels(seed: int, size=(40, 56), classes: int = 4) -> np.ndarray:
    """Blobs of classes -1..classes-1: coarse random cells, upsampled, with speckles (diagonal contacts too)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(-1, classes, (size[0] // 4, size[1] // 4))
    lab = np.kron(coarse, np.ones((4, 4), dtype=coarse.dtype))
    speckle = rng.random(size) < 0.08
    lab[speckle] = rng.integers(-1, classes, int(speckle.sum()))
    return lab


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_area", [1, 5, 30])
def test_objects_match_a_flood_fill(seed, min_area):
    inst = core("instances")
    lab = random_labels(seed)
    probs = torch.from_numpy(np.random.default_rng(seed + 10).random((4, *lab.shape), dtype=np.float32))
    names = ["a", "b", "c", "d"]
    found = inst.find_instances(torch.from_numpy(lab).to(torch.int8), [2, 0, 3], names, min_area, probs, frame=7)
    want = flood_fill_objects(lab, [0, 2, 3], min_area)
    assert len(found) == len(want) > 0
    for obj, (k, mask) in zip(found, want):
        ys, xs = np.nonzero(mask)
        assert (obj.class_index, obj.class_name, obj.frame) == (k, names[k], 7)
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) and obj.area == mask.sum()
        assert np.array_equal(obj.full_mask(lab.shape), mask)
        assert obj.confidence == pytest.approx(float(probs[k].numpy()[mask].mean()), rel=1e-6)


def test_min_area_and_crop_region_checks():
    inst = core("instances")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="min_area must be"):
            inst.find_instances(np.zeros((4, 4), int), [0], ["a"], bad)
    for bad in (0.5, 101.0):
        with pytest.raises(ValueError, match="crop_factor must be between 1 and 100"):
            inst.crop_region((0, 0, 2, 2), (10, 10), bad)


@pytest.mark.parametrize("box", [(10, 20, 30, 25), (0, 0, 5, 7), (90, 50, 100, 60), (3, 3, 97, 57), (40, 30, 41, 31)])
@pytest.mark.parametrize("factor", [1.0, 1.5, 3.0, 50.0])
def test_crop_region_holds_the_box_inside_the_image(box, factor):
    region = core("instances").crop_region(box, (60, 100), factor)
    x1, y1, x2, y2 = region
    assert 0 <= x1 <= box[0] and 0 <= y1 <= box[1] and box[2] <= x2 <= 100 and box[3] <= y2 <= 60
    for lo, hi, a, b, limit in ((box[0], box[2], x1, x2, 100), (box[1], box[3], y1, y2, 60)):
        want = min(limit, max(hi - lo, round((hi - lo) * factor)))
        assert b - a == want
        if 0 < a and b < limit:  # not pushed by the border: centred on the box (within half a pixel)
            assert abs((a + b) - (lo + hi)) <= 1
    if factor == 1.0:
        assert region == box


def test_instances_node_masks_json_and_segs():
    """Two frames of hand-made segmentations: every object of the chosen classes as a mask, a JSON record and a
    SEG whose crops put back in place give the frame and the object's mask."""
    classify, classes_mod = core("classify"), core("classes")
    cl = classes_mod.parse_classes("person, sky", background="floor")
    frames = [random_labels(s, (48, 64), 3) for s in (1, 2)]
    segs = [classify.Segmentation(torch.from_numpy(f), torch.full((3, 48, 64), 0.5), torch.zeros(4, 3, 4), cl,
                                  (48, 64)) for f in frames]
    image = torch.rand(2, 48, 64, 3)
    masks, (shape, seg_list), text, count = run("TridentInstances", segmentation=segs, image=image, classes="",
                                                min_area=6, crop_factor=2.0)[:4]
    want = [(b, k, m) for b, f in enumerate(frames) for k, m in flood_fill_objects(f, [1, 2], 6)]  # no background
    records = json.loads(text)
    assert count == len(want) == len(records) == len(seg_list) == masks.shape[0] > 2 and shape == (48, 64)
    assert {r["frame"] for r in records} == {0, 1}
    for (b, k, m), mask, rec, seg in zip(want, masks, records, seg_list):
        assert torch.equal(mask, torch.from_numpy(m).float())
        assert (rec["frame"], rec["class_index"], rec["class"], rec["area"]) == (b, k, cl.names[k], m.sum())
        assert rec["confidence"] == pytest.approx(0.5) and seg.confidence == pytest.approx(0.5)
        assert type(seg)._fields == IMPACT_SEG_FIELDS and seg.label == cl.names[k] and seg.control_net_wrapper is None
        assert list(seg.bbox) == rec["box"]
        x1, y1, x2, y2 = seg.crop_region
        assert torch.equal(seg.cropped_image, image[b:b + 1, y1:y2, x1:x2])
        assert seg.cropped_mask.dtype == np.float32 and np.array_equal(seg.cropped_mask, m[y1:y2, x1:x2])
    persons = run("TridentInstances", segmentation=segs, image=image, classes="PERSON", min_area=6, crop_factor=2.0)
    assert persons[3] == sum(k == 1 for _, k, _ in want)
    none = run("TridentInstances", segmentation=segs, image=image, classes="sky", min_area=10**6, crop_factor=2.0)
    assert none[0].shape == (1, 48, 64) and not none[0].any() and none[1] == ((48, 64), []) and none[3] == 0
    with pytest.raises(ValueError, match="connect the segmented image"):
        run("TridentInstances", segmentation=segs, image=image[:1], classes="", min_area=6, crop_factor=2.0)
    with pytest.raises(ValueError, match="not in the segmentation's classes"):
        run("TridentInstances", segmentation=segs, image=image, classes="horse", min_area=6, crop_factor=2.0)


def test_instances_node_keeps_the_largest_objects_per_frame(caplog):
    """A noisy map's thousands of specks would each be a full-size float mask: max_objects keeps the largest per
    frame (ties: the earlier), in their usual order, and one log line for the batch says how many were dropped
    (it was one line per frame: 300 for a 300-frame clip)."""
    classify, classes_mod = core("classify"), core("classes")
    cl = classes_mod.parse_classes("person, sky")
    frames = [random_labels(s, (48, 64), 2) for s in (3, 4)]
    segs = [classify.Segmentation(torch.from_numpy(f), torch.full((2, 48, 64), 0.5), torch.zeros(2, 3, 4), cl,
                                  (48, 64)) for f in frames]
    with caplog.at_level("WARNING"):
        masks, (_, seg_list), text, count = run("TridentInstances", segmentation=segs, image=torch.rand(2, 48, 64, 3),
                                                classes="", min_area=1, crop_factor=2.0, max_objects=3)[:4]
    want, dropped = [], 0
    for f in frames:
        every = flood_fill_objects(f, [0, 1], 1)
        largest = sorted(sorted(range(len(every)), key=lambda j: (-every[j][1].sum(), j))[:3])
        want += [every[j][1] for j in largest]
        dropped += len(every) - 3
    lines = [r.getMessage() for r in caplog.records if "largest objects of each frame" in r.getMessage()]
    assert lines == [f"Trident Instances: kept the 3 largest objects of each frame, dropped {dropped} smaller ones in "
                     "2 of 2 frame(s) (raise max_objects to keep more)"]
    assert count == 6 == len(json.loads(text)) == len(seg_list)
    assert all(torch.equal(m, torch.from_numpy(w).float()) for m, w in zip(masks, want))
    with pytest.raises(ValueError, match="max_objects"):
        run("TridentInstances", segmentation=segs, image=torch.rand(2, 48, 64, 3), classes="", min_area=1,
            crop_factor=2.0, max_objects=0)


def test_instances_node_crops_are_rgb_float_and_bad_images_are_refused():
    """SEGS crops are ComfyUI IMAGEs whatever the input's channels and dtype; NaN, empty and wrongly laid out
    IMAGEs are one clear error."""
    classify, classes_mod = core("classify"), core("classes")
    cl = classes_mod.parse_classes("person, sky", background="floor")
    frame = random_labels(3, (32, 40), 3)
    segs = [classify.Segmentation(torch.from_numpy(frame), torch.full((3, 32, 40), 0.5), torch.zeros(4, 3, 4), cl,
                                  (32, 40))]
    rgb = torch.rand(1, 32, 40, 3)
    for image, expect in ((torch.cat([rgb, torch.ones(1, 32, 40, 1)], -1), rgb), (rgb[..., :1], rgb[..., :1]),
                          (rgb.half(), rgb.half().float())):
        seg_list = run("TridentInstances", segmentation=segs, image=image, classes="", min_area=6,
                       crop_factor=2.0)[1][1]
        assert seg_list
        for seg in seg_list:
            x1, y1, x2, y2 = seg.crop_region
            assert seg.cropped_image.dtype == torch.float32 and seg.cropped_image.shape[-1] == 3
            assert torch.equal(seg.cropped_image, expect[:, y1:y2, x1:x2].float().expand(-1, -1, -1, 3))
    rgb8 = (rgb * 255).round().to(torch.uint8)  # integer IMAGEs: crops 0..1 as the float ones, not 0..255
    rgb16 = (rgb8.to(torch.int32) * 257).to(torch.uint16)
    for image, expect in ((rgb8, rgb8.float() / 255), (rgb16, rgb8.float() / 255)):
        for seg in run("TridentInstances", segmentation=segs, image=image, classes="", min_area=6,
                       crop_factor=2.0)[1][1]:
            x1, y1, x2, y2 = seg.crop_region
            assert seg.cropped_image.dtype == torch.float32
            assert torch.allclose(seg.cropped_image, expect[:, y1:y2, x1:x2], atol=1e-6)
    before = rgb.clone()
    whole = run("TridentInstances", segmentation=segs, image=rgb, classes="", min_area=6, crop_factor=100.0)[1][1]
    assert whole[0].crop_region == [0, 0, 40, 32]
    with torch.inference_mode():  # (a detailer, a node too, painting on its crop leaves the cached IMAGE as it was)
        whole[0].cropped_image.zero_()
    assert torch.equal(rgb, before)
    for image, message in ((torch.full((1, 32, 40, 3), float("nan")), "NaN"), (rgb[0], "not an IMAGE batch"),
                           (rgb.permute(0, 3, 1, 2), "not an IMAGE batch"), (rgb[:0], "IMAGE batch of 0")):
        with pytest.raises(ValueError, match=message):
            run("TridentInstances", segmentation=segs, image=image, classes="", min_area=6, crop_factor=2.0)


def test_cli_writes_one_mask_per_object_and_a_json(small_ckpts, photo, tmp_path, capsys):
    from PIL import Image

    from trident_core.cli import main

    img = tmp_path / "astronaut.png"
    Image.fromarray(photo[:120, :160]).save(img)
    models = ["--clip", str(small_ckpts["clip"]), "--dino", str(small_ckpts["dino"]), "--sam", str(small_ckpts["sam"]),
              "--no-refine", "--device", "cpu", "--no-download"]
    out, npz = tmp_path / "out", tmp_path / "r.npz"
    rc = main(["segment", str(img), "--classes", "sky, person, flag", *models, "--out", str(out), "--save-npz",
               str(npz), "--instances", "--min-area", "5"])
    assert rc == 0
    labels = np.load(npz)["labels"]
    want = flood_fill_objects(labels, [0, 1, 2], 5)
    records = json.loads((out / "instances.json").read_text())
    assert len(records) == len(want) > 0
    for i, ((k, mask), rec) in enumerate(zip(want, records)):
        ys, xs = np.nonzero(mask)
        assert rec["class_index"] == k and rec["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert rec["mask"] == f"instances/{i:03d}_{rec['class']}.png" and rec["frame"] == 0
        assert np.array_equal(np.array(Image.open(out / rec["mask"])) > 0, mask)
    with pytest.raises(SystemExit):
        main(["segment", str(img), "--classes", "sky, grass", *models, "--out", str(out), "--instances",
              "--min-area", "0"])
    assert "--min-area must be a whole number of pixels >= 1, not 0" in capsys.readouterr().err


def test_mask_stack_is_every_full_mask_and_builds_no_full_size_temporaries():
    """The masks output: object i's mask at the image's size in row i (against masks drawn here); the NumPy memory
    it allocates stays under one full-size mask, whatever the number of objects (a list of full-size masks, then
    stacked, would cost objects x H x W bytes on top of the output)."""
    import tracemalloc

    instances = core("instances")
    h, w = 90, 120
    labels, truth = np.zeros((h, w), np.int64), []
    for y in range(2, h - 8, 11):
        for x in range(3, w - 8, 13):
            labels[y:y + 7, x:x + 6] = 1
            mask = np.zeros((h, w), bool)
            mask[y:y + 7, x:x + 6] = True
            truth.append(mask)
    objects = [o for frame in range(4) for o in instances.find_instances(labels, [1], ["bg", "thing"], 1,
                                                                           frame=frame)]
    assert len(objects) == 4 * len(truth) > 200
    tracemalloc.start()
    try:
        stack = instances.mask_stack(objects, (h, w))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stack.dtype == torch.float32 and torch.equal(stack, torch.from_numpy(np.stack(truth * 4)).float())
    assert peak < h * w
    assert torch.equal(instances.mask_stack([], (h, w)), torch.zeros((1, h, w)))
