"""Tests of trident_core.evaluation: mmseg-exact metrics, dataset layouts, resume, and torchrun sharding."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trident_core.evaluation import (
    add_eval_arguments,
    build_dataset,
    compute_metrics,
    confusion_matrix,
    evaluate,
    format_table,
    init_distributed,
    load_label,
    reduce_zero_label,
)

REPO = Path(__file__).resolve().parents[1]
NOT_OFFICIAL = "ignore:.*official split:UserWarning"


# ----------------------------------------------------------------------------------------------- hand references


def hand_confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel-by-pixel (C, C+1) confusion: rows truth, columns prediction, last column = prediction not a class."""
    conf = np.zeros((num_classes, num_classes + 1), np.int64)
    for p, g in zip(pred.ravel().tolist(), label.ravel().tolist()):
        if g != 255:
            conf[g, p if 0 <= p < num_classes else num_classes] += 1
    return conf


def mmseg_areas(preds: list[np.ndarray], labels: list[np.ndarray], num_classes: int) -> tuple[np.ndarray, ...]:
    """Summed (intersect, union, pred, label) areas computed the way mmseg's IoUMetric does, with torch.histc."""
    totals = [torch.zeros(num_classes) for _ in range(4)]
    for pred, label in zip(preds, labels):
        p, g = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(label.astype(np.int64))
        keep = g != 255
        p, g = p[keep], g[keep]
        hist = [torch.histc(t.float(), bins=num_classes, min=0, max=num_classes - 1) for t in (p[p == g], p, g)]
        areas = (hist[0], hist[1] + hist[2] - hist[0], hist[1], hist[2])
        totals = [t + a for t, a in zip(totals, areas)]
    return tuple(t.double().numpy() for t in totals)


def fake_predict(num_classes: int):
    """A deterministic 'segmenter': labels (including -1 = no class) from a fixed function of the pixels."""

    def predict(rgb: np.ndarray) -> np.ndarray:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        return (rgb[..., 0].astype(np.int64) * 7 + rgb[..., 1] + 3 * rgb[..., 2]) % (num_classes + 1) - 1

    return predict


def fake_predict_pil(path: Path, num_classes: int) -> np.ndarray:
    """The fake segmenter on the image read with PIL (independent of the code's cv2 reader)."""
    return fake_predict(num_classes)(np.array(Image.open(path).convert("RGB")))


# ------------------------------------------------------------------------------------------------------ metric


def test_confusion_and_metrics_against_hand_computation():
    label = np.array([[0, 0, 1, 1], [2, 255, 2, 4]], np.uint8)
    pred = np.array([[0, 5, 1, 4], [2, 3, -1, 4]])
    conf = confusion_matrix(pred, label, 6)
    # pixels (truth, pred): (0,0) (0,5) (1,1) (1,4) (2,2) [ignored] (2,none) (4,4)
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 1, 0],
            [0, 1, 0, 0, 1, 0, 0],
            [0, 0, 1, 0, 0, 0, 1],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64
    m = compute_metrics(conf)
    np.testing.assert_array_equal(m.area_intersect, [1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(m.area_label, [2, 2, 2, 0, 1, 0])
    np.testing.assert_array_equal(m.area_pred_label, [1, 1, 1, 0, 2, 1])
    np.testing.assert_array_equal(m.area_union, [2, 2, 2, 0, 2, 1])
    # class 3: absent everywhere -> NaN, left out of both means; class 5: predicted only -> IoU 0, Acc NaN
    np.testing.assert_allclose(m.iou, [0.5, 0.5, 0.5, np.nan, 0.5, 0.0])
    np.testing.assert_allclose(m.acc, [0.5, 0.5, 0.5, np.nan, 1.0, np.nan])
    assert m.miou == pytest.approx(2.0 / 5)
    assert m.macc == pytest.approx(2.5 / 4)
    assert m.aacc == pytest.approx(4 / 7)
    table = format_table(m, ["c0", "c1", "c2", "c3", "c4", "c5"])
    assert "aAcc: 57.14  mIoU: 40.00  mAcc: 62.50" in table
    assert "| c3    |     nan |     nan |" in table
    assert "| c4    |   50.00 |  100.00 |" in table


def test_metrics_match_mmseg_histc_formulas_on_random_images():
    rng = np.random.default_rng(0)
    num_classes = 7
    labels = [rng.choice([0, 1, 2, 4, 6, 255], size=(13, 17)).astype(np.uint8) for _ in range(4)]
    preds = [rng.integers(-2, num_classes + 2, size=(13, 17)) for _ in range(4)]  # some out of range
    conf = sum(confusion_matrix(p, g, num_classes) for p, g in zip(preds, labels))
    np.testing.assert_array_equal(conf, sum(hand_confusion(p, g, num_classes) for p, g in zip(preds, labels)))
    m = compute_metrics(conf)
    intersect, union, pred_area, label_area = mmseg_areas(preds, labels, num_classes)
    np.testing.assert_array_equal(m.area_intersect, intersect)
    np.testing.assert_array_equal(m.area_union, union)
    np.testing.assert_array_equal(m.area_pred_label, pred_area)
    np.testing.assert_array_equal(m.area_label, label_area)
    with np.errstate(invalid="ignore", divide="ignore"):
        assert m.miou == pytest.approx(np.nanmean(intersect / union))
        assert m.macc == pytest.approx(np.nanmean(intersect / label_area))
    assert m.aacc == pytest.approx(intersect.sum() / label_area.sum())
    assert np.isnan(m.acc[3]) and np.isnan(m.acc[5])  # never in the labels


def test_confusion_rejects_bad_inputs():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros((2, 2), int), np.array([[0, 9], [255, 1]], np.uint8), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((2, 2), np.uint8), 3)
    with pytest.raises(TypeError):
        confusion_matrix(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8), 3)


def test_reduce_zero_label_like_mmseg():
    label = np.array([0, 1, 2, 21, 150, 254, 255], np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(label), [255, 0, 1, 20, 149, 253, 255])


# ------------------------------------------------------------------------------------------------------ datasets

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [7, 7, 7] * 251 + [224, 224, 192]


def write_label(path: Path, label: np.ndarray, palette: bool = False) -> None:
    """A label PNG: single-channel 'L', or a VOC-style palette ('P') image whose pixels are class indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.ascontiguousarray(label, np.uint8)
    img = Image.frombytes("P" if palette else "L", (label.shape[1], label.shape[0]), label.tobytes())
    if palette:
        img.putpalette(VOC_PALETTE)
    img.save(path)


def write_image(path: Path, rgb: np.ndarray) -> None:
    """An RGB image file (JPEG or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


# preset, folder under data root, image dir, label dir, image suffix, label suffix, split file, reduce, classes
LAYOUTS = [
    ("voc21", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", ".jpg", ".png",
     "ImageSets/Segmentation/val.txt", False, 21),
    ("voc20", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", ".jpg", ".png",
     "ImageSets/Segmentation/val.txt", True, 20),
    ("context60", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
     "ImageSets/SegmentationContext/val.txt", False, 60),
    ("context59", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
     "ImageSets/SegmentationContext/val.txt", True, 59),
    ("coco_object", "coco_object", "images/val2017", "annotations/val2017", ".jpg", "_instanceTrainIds.png",
     None, False, 81),
    ("coco_stuff", "coco_stuff164k", "images/val2017", "annotations/val2017", ".jpg", "_labelTrainIds.png",
     None, False, 171),
    ("city_scapes", "cityscapes", "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png",
     "_gtFine_labelTrainIds.png", None, False, 19),
    ("ade20k", "ade/ADEChallengeData2016", "images/validation", "annotations/validation", ".jpg", ".png",
     None, True, 150),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_dataset_reader_layout_order_and_labels(tmp_path, layout):
    preset, folder, img_dir, seg_dir, img_sfx, seg_sfx, split, reduce, n_cls = layout
    root = tmp_path / folder
    # unsorted on purpose: split files keep their order, scanned folders are sorted by path (cityscapes nests)
    names = ["b/x_2", "a/x_9", "a/x_10"] if preset == "city_scapes" else ["2008_000002", "2007_000033", "2009_0001"]
    raw_labels = {}
    for k, name in enumerate(names):
        write_image(root / img_dir / (name + img_sfx), np.full((6, 8, 3), 40 * k, np.uint8))
        raw = np.tile(np.array([[0, 1, n_cls - 1 + reduce, 255]], np.uint8), (6, 2))  # max value -> last class
        raw[0, 0] = k
        raw_labels[name] = raw
        write_label(root / seg_dir / (name + seg_sfx), raw, palette=preset.startswith("voc"))
    if split:
        (root / split).parent.mkdir(parents=True, exist_ok=True)
        (root / split).write_text("\n".join(names) + "\n\n")
        expected_order = names
    else:
        (root / seg_dir / ("stray" + seg_sfx.replace(".png", ".txt"))).write_text("not an image")
        (root / img_dir / (".hidden" + img_sfx)).write_bytes(b"")  # hidden files are skipped, as mmengine does
        expected_order = sorted(names)
    with pytest.warns(UserWarning, match="official split"):
        ds = build_dataset(preset, tmp_path)
    assert len(ds) == 3 and ds.num_classes == n_cls == len(ds.classes)
    assert ds.root == root
    for i, name in enumerate(expected_order):
        sample = ds[i]
        assert sample.name == name
        assert sample.image_path == root / img_dir / (name + img_sfx)
        raw = raw_labels[name]
        want = np.where(raw == 0, 255, np.where(raw == 255, 255, raw.astype(int) - 1)) if reduce else raw
        assert sample.label.dtype == np.uint8 and sample.label.shape == (6, 8)
        np.testing.assert_array_equal(sample.label, want)
    assert [s.name for s in ds[1:]] == expected_order[1:]


def test_voc_palette_png_reads_indices_not_colours(tmp_path):
    label = np.array([[0, 1, 2, 255], [3, 3, 0, 255]], np.uint8)
    write_label(tmp_path / "l.png", label, palette=True)
    assert Image.open(tmp_path / "l.png").mode == "P"
    np.testing.assert_array_equal(load_label(tmp_path / "l.png"), label)
    reduced = load_label(tmp_path / "l.png", reduce_zero=True)
    np.testing.assert_array_equal(reduced, [[255, 0, 1, 255], [2, 2, 255, 255]])


def test_missing_dataset_folder_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ade/ADEChallengeData2016/images/validation"):
        build_dataset("ade20k", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_dataset("voc21", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown preset"):
        build_dataset("voc", tmp_path)


def test_missing_split_and_label_files_fail_early(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation/val.txt"):
        build_dataset("voc21", tmp_path)
    write_image(tmp_path / "coco_stuff164k/images/val2017/000000000139.jpg", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "coco_stuff164k/annotations/val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="000000000139_labelTrainIds.png"):
        build_dataset("coco_stuff", tmp_path)


def test_reference_folder_names_and_direct_dataset_root_are_found(tmp_path):
    write_image(tmp_path / "COCOStuff/images/val2017/1.jpg", np.zeros((4, 4, 3), np.uint8))
    write_label(tmp_path / "COCOStuff/annotations/val2017/1_labelTrainIds.png", np.zeros((4, 4), np.uint8))
    with pytest.warns(UserWarning):
        assert build_dataset("coco_stuff", tmp_path).root == tmp_path / "COCOStuff"
    with pytest.warns(UserWarning):
        assert build_dataset("coco_stuff", tmp_path / "COCOStuff").root == tmp_path / "COCOStuff"


# -------------------------------------------------------------------------------------------------- the runner

CITY = "cityscapes"
N_CITY = 19


def make_cityscapes(data_root: Path, count: int = 5) -> list[tuple[Path, Path]]:
    """A tiny Cityscapes val set (lossless PNG images); returns (image, label) paths in the expected order."""
    rng = np.random.default_rng(1)
    pairs = []
    for k in range(count):
        city = "aachen" if k < 2 else "bonn"
        stem = f"{city}/{city}_{k:06d}_000019"
        img = data_root / CITY / "leftImg8bit/val" / f"{stem}_leftImg8bit.png"
        lab = data_root / CITY / "gtFine/val" / f"{stem}_gtFine_labelTrainIds.png"
        write_image(img, rng.integers(0, 256, size=(9 + k, 11, 3), dtype=np.uint8))
        write_label(lab, rng.choice([*range(N_CITY), 255, 255], size=(9 + k, 11)))
        pairs.append((img, lab))
    return sorted(pairs)


def hand_expected(pairs: list[tuple[Path, Path]]) -> np.ndarray:
    """Confusion of the fake segmenter over the pairs, computed independently of the code under test."""
    return sum(
        hand_confusion(fake_predict_pil(img, N_CITY), np.array(Image.open(lab)), N_CITY) for img, lab in pairs
    )


def city_dataset(data_root: Path):
    """The Cityscapes reader on the synthetic set (its size warning silenced)."""
    with pytest.warns(UserWarning):
        return build_dataset("city_scapes", data_root)


def test_evaluate_matches_hand_computation_and_writes_json(tmp_path, capsys):
    pairs = make_cityscapes(tmp_path)
    out = tmp_path / "res" / "city.json"
    result = evaluate(fake_predict(N_CITY), city_dataset(tmp_path), result_json=out, config={"refine": False})
    expected = hand_expected(pairs)
    np.testing.assert_array_equal(np.array(result["confusion_matrix"]), expected)
    m = compute_metrics(expected)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["preset"] == "city_scapes" and saved["num_images"] == 5 and saved["world_size"] == 1
    assert saved["classes"][0] == "road" and len(saved["IoU"]) == N_CITY
    inter, label_area = np.diag(expected[:, :N_CITY]), expected.sum(1)
    union = label_area + expected[:, :N_CITY].sum(0) - inter
    assert saved["mIoU"] == np.round(100 * np.mean(inter / union), 2) == np.round(100 * m.miou, 2)
    assert saved["aAcc"] == np.round(100 * inter.sum() / label_area.sum(), 2)
    assert saved["config"] == {"refine": False}
    assert saved["timings"]["images_this_run"] == 5
    captured = capsys.readouterr()
    assert f"mIoU: {saved['mIoU']:.2f}" in captured.out and "| road " in captured.out
    assert "[eval city_scapes] 5/5" in captured.err


def test_evaluate_limit_and_plain_sample_lists(tmp_path):
    pairs = make_cityscapes(tmp_path)
    result = evaluate(fake_predict(N_CITY), city_dataset(tmp_path), limit=2, progress=False)
    np.testing.assert_array_equal(np.array(result["confusion_matrix"]), hand_expected(pairs[:2]))
    samples = city_dataset(tmp_path)[:3]
    plain = evaluate(fake_predict(N_CITY), samples, N_CITY, progress=False)
    np.testing.assert_array_equal(np.array(plain["confusion_matrix"]), hand_expected(pairs[:3]))
    assert plain["preset"] == "custom" and plain["classes"][0] == "0"
    with pytest.raises(ValueError, match="num_classes"):
        evaluate(fake_predict(N_CITY), samples)


def test_prediction_of_wrong_size_is_an_error(tmp_path):
    make_cityscapes(tmp_path, 1)
    with pytest.raises(ValueError, match="prediction shape"):
        evaluate(lambda rgb: np.zeros((2, 2), int), city_dataset(tmp_path), progress=False)


class Interrupt(Exception):
    """Raised by the fake segmenter to simulate a crash."""


def counting_predict(num_classes: int, calls: list[int], fail_after: int | None = None):
    """The fake segmenter that records its calls and raises once it has been called ``fail_after`` times."""
    inner = fake_predict(num_classes)

    def predict(rgb: np.ndarray) -> np.ndarray:
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupt
        calls.append(1)
        return inner(rgb)

    return predict


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_resume_after_exception_gives_the_same_numbers(tmp_path):
    pairs = make_cityscapes(tmp_path, 5)
    full = evaluate(fake_predict(N_CITY), city_dataset(tmp_path), progress=False)
    out = tmp_path / "run.json"
    calls: list[int] = []
    with pytest.raises(Interrupt):
        evaluate(counting_predict(N_CITY, calls, 3), city_dataset(tmp_path), result_json=out, save_every=100)
    assert len(calls) == 3 and not out.exists()
    state = tmp_path / "run.json.state-rank0of1.npz"
    with np.load(state) as data:
        assert data["done"].tolist() == [0, 1, 2]
        np.testing.assert_array_equal(data["confusion"], hand_expected(pairs[:3]))
    calls.clear()
    resumed = evaluate(counting_predict(N_CITY, calls), city_dataset(tmp_path), result_json=out, progress=False)
    assert len(calls) == 2
    assert resumed["confusion_matrix"] == full["confusion_matrix"]
    np.testing.assert_array_equal(np.array(full["confusion_matrix"]), hand_expected(pairs))
    assert (resumed["mIoU"], resumed["aAcc"], resumed["mAcc"]) == (full["mIoU"], full["aAcc"], full["mAcc"])
    assert resumed["timings"]["images_this_run"] == 2
    assert json.loads(out.read_text())["confusion_matrix"] == full["confusion_matrix"]
    calls.clear()  # a finished run resumes to the same result without predicting again
    assert evaluate(counting_predict(N_CITY, calls), city_dataset(tmp_path), result_json=out, progress=False)[
        "confusion_matrix"
    ] == full["confusion_matrix"]
    assert calls == []


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_resume_refuses_another_config_and_no_resume_starts_over(tmp_path):
    make_cityscapes(tmp_path, 4)
    out = tmp_path / "run.json"
    calls: list[int] = []
    with pytest.raises(Interrupt):
        evaluate(counting_predict(N_CITY, calls, 2), city_dataset(tmp_path), result_json=out, config={"refine": True})
    with pytest.raises(ValueError, match="config"):
        evaluate(fake_predict(N_CITY), city_dataset(tmp_path), result_json=out, config={"refine": False})
    with pytest.raises(ValueError, match="num_images"):
        evaluate(fake_predict(N_CITY), city_dataset(tmp_path), result_json=out, config={"refine": True}, limit=3)
    import shutil

    shutil.copy(tmp_path / "run.json.state-rank0of1.npz", tmp_path / "run.json.state-rank1of2.npz")  # (2 processes)
    (tmp_path / "run.json.state-rankings-of-2024.npz").write_bytes(b"a file of the user's")  # not ours: never deleted
    (tmp_path / "run.json.state-rank0of3.npz").write_bytes(b"")  # (an empty file of that name is no state either)
    with pytest.raises(ValueError, match="another number of processes"):
        evaluate(fake_predict(N_CITY), city_dataset(tmp_path), result_json=out, config={"refine": True})
    calls.clear()
    evaluate(counting_predict(N_CITY, calls), city_dataset(tmp_path), result_json=out, resume=False, progress=False)
    assert len(calls) == 4
    assert not (tmp_path / "run.json.state-rank1of2.npz").exists()
    assert (tmp_path / "run.json.state-rankings-of-2024.npz").read_bytes() == b"a file of the user's"
    assert (tmp_path / "run.json.state-rank0of3.npz").exists()


@pytest.mark.filterwarnings(NOT_OFFICIAL)
@pytest.mark.parametrize("damage", ["truncated", "cut_before_its_meta", "deep_meta", "done_as_text",
                                    "negative_counts", "nan_time", "config_not_an_object", "done_twice"])
def test_a_damaged_resume_state_starts_over(tmp_path, damage, capsys):
    pairs = make_cityscapes(tmp_path, 3)
    out = tmp_path / "run.json"
    with pytest.raises(Interrupt):
        evaluate(counting_predict(N_CITY, [], 2), city_dataset(tmp_path), result_json=out, save_every=100)
    state = tmp_path / "run.json.state-rank0of1.npz"
    if damage == "truncated":  # its central directory lost; its first member, the meta, still whole
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "cut_before_its_meta":  # nothing left proves it ours: left for the user to move away
        state.write_bytes(state.read_bytes()[:200])
        with pytest.raises(ValueError, match="is not a state Trident wrote: move it away"):
            evaluate(counting_predict(N_CITY, []), city_dataset(tmp_path), result_json=out, progress=False)
        return
    else:
        with np.load(state) as data:
            arrays = dict(data)
        meta = json.loads(str(arrays["meta"]))
        arrays.update({"deep_meta": {"meta": np.array("[" * 100000 + "]" * 100000)},
                       "done_as_text": {"done": np.array(["0", "1"])},
                       "negative_counts": {"confusion": -arrays["confusion"] - 1},
                       "nan_time": {"predict_s": np.float64("nan")},
                       "config_not_an_object": {"meta": np.array(json.dumps({**meta, "config": "[1]"}))},
                       "done_twice": {"done": np.array([0, 0])}}[damage])
        with open(state, "wb") as f:
            np.savez(f, **arrays)
    calls: list[int] = []
    if damage == "config_not_an_object":  # a readable state of other settings: the usual refusal, no traceback
        with pytest.raises(ValueError, match="different run .*--no-resume"):
            evaluate(counting_predict(N_CITY, calls), city_dataset(tmp_path), result_json=out, progress=False)
        return
    result = evaluate(counting_predict(N_CITY, calls), city_dataset(tmp_path), result_json=out, progress=False)
    err = capsys.readouterr().err
    assert len(calls) == 3 and "is damaged" in err and "starting over" in err
    np.testing.assert_array_equal(np.array(result["confusion_matrix"]), hand_expected(pairs))


HARD_KILL_SCRIPT = """
import os, sys
import numpy as np
from trident_core.evaluation import build_dataset, evaluate

data_root, out, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = []

def predict(rgb):
    if len(calls) == kill_after:
        os._exit(17)  # no exception handlers, no finally: only the periodic saves survive
    calls.append(1)
    return (rgb[..., 0].astype(np.int64) * 7 + rgb[..., 1] + 3 * rgb[..., 2]) % 20 - 1

evaluate(predict, build_dataset("city_scapes", data_root), result_json=out, save_every=2, progress=False)
print("calls", len(calls))
"""


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_resume_after_hard_kill_uses_the_periodic_state(tmp_path):
    pairs = make_cityscapes(tmp_path, 5)
    script = tmp_path / "kill.py"
    script.write_text(HARD_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "k.json"
    cmd = [sys.executable, str(script), str(tmp_path), str(out)]
    killed = subprocess.run([*cmd, "3"], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 17, killed.stderr
    with np.load(tmp_path / "k.json.state-rank0of1.npz") as data:
        assert data["done"].tolist() == [0, 1]  # saved after 2 images; the 3rd was lost with the process
    done = subprocess.run([*cmd, "99"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "calls 3" in done.stdout
    np.testing.assert_array_equal(np.array(json.loads(out.read_text())["confusion_matrix"]), hand_expected(pairs))


TORCHRUN_SCRIPT = """
import json, sys
import numpy as np
import torch.distributed as dist
from trident_core.evaluation import build_dataset, evaluate, init_distributed

data_root, out = sys.argv[1], sys.argv[2]
rank, world, device = init_distributed()
seen = []

def predict(rgb):
    seen.append(int(rgb.astype(np.int64).sum()))
    return (rgb[..., 0].astype(np.int64) * 7 + rgb[..., 1] + 3 * rgb[..., 2]) % 20 - 1

result = evaluate(predict, build_dataset("city_scapes", data_root), result_json=out, progress=False)
with open(f"{out}.seen{rank}", "w") as f:
    json.dump({"rank": rank, "world": world, "device": str(device), "seen": seen, "mIoU": result["mIoU"]}, f)
if dist.is_initialized():
    dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_torchrun_two_processes_equal_one_process(tmp_path):
    pairs = make_cityscapes(tmp_path, 5)
    script = tmp_path / "dist_eval.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    single = subprocess.run([sys.executable, str(script), str(tmp_path), str(one)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.run([*launch, str(script), str(tmp_path), str(two)], env=env, capture_output=True, text=True,
                           timeout=180)
    assert multi.returncode == 0, multi.stderr[-3000:]
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    np.testing.assert_array_equal(np.array(r2["confusion_matrix"]), hand_expected(pairs))
    assert r2["confusion_matrix"] == r1["confusion_matrix"]
    assert (r2["mIoU"], r2["aAcc"], r2["mAcc"], r2["IoU"]) == (r1["mIoU"], r1["aAcc"], r1["mAcc"], r1["IoU"])
    assert (r1["world_size"], r2["world_size"], r2["num_images"]) == (1, 2, 5)
    sums = [int(np.array(Image.open(img).convert("RGB")).astype(np.int64).sum()) for img, _ in pairs]
    for rank in (0, 1):
        seen = json.loads(Path(f"{two}.seen{rank}").read_text())
        assert (seen["rank"], seen["world"], seen["device"]) == (rank, 2, "cpu")
        assert seen["seen"] == sums[rank::2]  # rank r takes images r, r+2, r+4
        assert seen["mIoU"] == r1["mIoU"]  # every rank gets the all-reduced result
    assert (tmp_path / "two.json.state-rank0of2.npz").is_file() and (tmp_path / "two.json.state-rank1of2.npz").is_file()


# ------------------------------------------------------------------------------------------- CLI / distributed


def test_add_eval_arguments():
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--preset", "voc21", "--data-root", "/d"])
    assert (args.preset, args.data_root, args.limit, args.refine, args.out, args.resume) == (
        "voc21", "/d", None, None, None, True,
    )
    args = parser.parse_args(
        ["--preset", "ade20k", "--data-root", "d", "--limit", "7", "--no-refine", "--out", "r.json", "--no-resume"]
    )
    assert (args.limit, args.refine, args.out, args.resume) == (7, False, "r.json", False)
    assert parser.parse_args(["--preset", "voc20", "--data-root", "d", "--refine"]).refine is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "voc", "--data-root", "d"])


def test_init_distributed_outside_torchrun_does_nothing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rank, world, device = init_distributed()
    assert (rank, world) == (0, 1)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.distributed.is_initialized()


# preset, folder under data root, image dir, label dir, split file (None: scanned), classes
SIXTEEN_BIT_LAYOUTS = [
    ("ade847", "ADE20K_2021_17_01", "images_detectron2/validation", "annotations_detectron2/validation", None, 847),
    ("context459", "VOCdevkit/VOC2010", "JPEGImages", "annotations_detectron2/pc459_val",
     "ImageSets/SegmentationContext/val.txt", 459),
]


@pytest.mark.filterwarnings(NOT_OFFICIAL)
@pytest.mark.parametrize("layout", SIXTEEN_BIT_LAYOUTS, ids=[row[0] for row in SIXTEEN_BIT_LAYOUTS])
def test_sixteen_bit_layouts_read_labels_and_ignore_65535(tmp_path, layout):
    """ADE20K-Full and Pascal Context 459 in detectron2's layouts: 16-bit TIFF labels read unchanged, 65535 is
    ignored and label 255 is a class like any other (the 8-bit sets' ignore value)."""
    preset, folder, img_dir, seg_dir, split, n_cls = layout
    root = tmp_path / folder
    names = ["img_b", "img_a"]
    raws = {}
    for k, name in enumerate(names):
        write_image(root / img_dir / (name + ".jpg"), np.full((4, 6, 3), 50 * k, np.uint8))
        raw = np.array([[0, 255, n_cls - 1, 65535, 300, k + 1]] * 4, np.uint16)
        raws[name] = raw
        (root / seg_dir).mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw).save(root / seg_dir / (name + ".tif"))
    if split:
        (root / split).parent.mkdir(parents=True, exist_ok=True)
        (root / split).write_text("\n".join(names) + "\n")
    ds = build_dataset(preset, tmp_path)
    assert ds.root == root and ds.num_classes == n_cls == len(ds.classes) and ds.ignore_index == 65535
    order = names if split else sorted(names)
    for i, name in enumerate(order):
        assert ds[i].name == name and ds[i].label.dtype == np.uint16
        np.testing.assert_array_equal(ds[i].label, raws[name])

    def predict(rgb: np.ndarray) -> np.ndarray:
        return np.full(rgb.shape[:2], 255)

    result = evaluate(predict, ds, ds.num_classes, ignore_index=ds.ignore_index, progress=False)
    conf = np.zeros((n_cls, n_cls + 1), np.int64)
    for raw in raws.values():
        for g in raw.ravel().tolist():
            if g != 65535:
                conf[g, 255] += 1
    np.testing.assert_array_equal(np.array(result["confusion_matrix"]), conf)
    assert conf[255, 255] == 8  # class 255 is evaluated, not ignored


def test_ade847_split_file_is_used_when_present(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    (root / "annotations_detectron2/validation").mkdir(parents=True)
    for name in ("b", "a"):
        write_image(root / "images_detectron2/validation" / f"{name}.jpg", np.zeros((4, 4, 3), np.uint8))
        Image.fromarray(np.zeros((4, 4), np.uint16)).save(root / "annotations_detectron2/validation" / f"{name}.tif")
    (root / "validation.txt").write_text("b\na\n")
    with pytest.warns(UserWarning, match="official split"):
        assert build_dataset("ade847", tmp_path).names == ["b", "a"]


# ------------------------------------------------------------------------------------ a researcher's review (eval)


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_a_label_value_beyond_the_classes_names_its_file(tmp_path):
    """The error said only "label values [21] are outside [0, 21)": which of 5000 files was not said."""
    pairs = make_cityscapes(tmp_path, 3)
    bad = np.array(Image.open(pairs[1][1]))
    bad[0, 0] = N_CITY
    write_label(pairs[1][1], bad)
    with pytest.raises(ValueError, match=rf"{pairs[1][1].name}: label values \[{N_CITY}\] are outside"):
        evaluate(fake_predict(N_CITY), city_dataset(tmp_path), progress=False)


def test_linked_city_folders_are_read_as_mmseg_lists_them_and_a_link_loop_ends(tmp_path):
    """os.walk skipped linked folders: a Cityscapes copy with linked cities lost them without a word."""
    pairs = make_cityscapes(tmp_path / "real", 4)
    root = tmp_path / "data" / CITY
    for part in ("leftImg8bit/val", "gtFine/val"):
        (root / part).mkdir(parents=True)
        for city in ("aachen", "bonn"):
            (root / part / city).symlink_to(tmp_path / "real" / CITY / part / city, target_is_directory=True)
    (tmp_path / "real" / CITY / "leftImg8bit/val/bonn/loop").symlink_to("..", target_is_directory=True)
    with pytest.warns(UserWarning):
        linked = build_dataset("city_scapes", tmp_path / "data")
    assert len(linked) == len(pairs) == 4
    assert [Path(p).name for p in linked.image_paths] == [img.name for img, _ in pairs]


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_the_result_says_whether_the_split_is_the_official_one_and_where_its_data_is(tmp_path, monkeypatch):
    make_cityscapes(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    result = evaluate(fake_predict(N_CITY), city_dataset(Path(".")), progress=False)
    assert result["official_split"] is False and result["dataset_root"] == str(tmp_path / CITY)
    whole = city_dataset(Path("."))
    whole.official = True  # (as a folder holding the published split's number of images is)
    assert evaluate(fake_predict(N_CITY), whole, progress=False)["official_split"] is True
    assert evaluate(fake_predict(N_CITY), whole, limit=1, progress=False)["official_split"] is False  # part of it


def make_voc(data_root: Path, labels: list[np.ndarray]) -> list[tuple[Path, Path]]:
    """A tiny VOC2012 val set (JPEG images, palette label PNGs, its split file); (image, label) paths."""
    voc = data_root / "VOCdevkit/VOC2012"
    rng = np.random.default_rng(2)
    pairs = []
    for k, label in enumerate(labels):
        img, lab = voc / "JPEGImages" / f"2007_{k:06d}.jpg", voc / "SegmentationClass" / f"2007_{k:06d}.png"
        write_image(img, rng.integers(0, 256, size=(*label.shape, 3), dtype=np.uint8))
        write_label(lab, label, palette=True)
        pairs.append((img, lab))
    (voc / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("".join(f"{img.stem}\n" for img, _ in pairs))
    return pairs


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_a_kept_state_serves_only_its_own_run_and_says_so(tmp_path, capsys):
    """A finished run's state answered a rerun after its label maps changed (the old numbers, exit 0, not a word),
    and `r.txt` took `r.json`'s state (both named by the stem)."""
    import shutil

    pairs = make_cityscapes(tmp_path / "a", 3)
    out = tmp_path / "r.json"
    first = evaluate(fake_predict(N_CITY), city_dataset(tmp_path / "a"), result_json=out, progress=False)
    capsys.readouterr()
    calls: list[int] = []
    again = evaluate(counting_predict(N_CITY, calls), city_dataset(tmp_path / "a"), result_json=out, progress=False)
    assert calls == [] and again["confusion_matrix"] == first["confusion_matrix"]
    assert "resumed: 3 of the 3 images from" in capsys.readouterr().err
    evaluate(counting_predict(N_CITY, calls), city_dataset(tmp_path / "a"), result_json=tmp_path / "r.txt",
             progress=False)
    assert len(calls) == 3  # its own state, not r.json's
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ValueError, match=r"a different run \(--data-root, "):
        evaluate(fake_predict(N_CITY), city_dataset(tmp_path / "b"), result_json=out, progress=False)
    write_label(pairs[1][1], np.zeros(np.array(Image.open(pairs[1][1])).shape, np.uint8))
    with pytest.raises(ValueError, match=r"image or label files \(sizes or modification times\) differ"):
        evaluate(fake_predict(N_CITY), city_dataset(tmp_path / "a"), result_json=out, progress=False)
    fresh = evaluate(fake_predict(N_CITY), city_dataset(tmp_path / "a"), result_json=out, resume=False,
                     progress=False)
    np.testing.assert_array_equal(np.array(fresh["confusion_matrix"]), hand_expected(pairs))
    assert fresh["confusion_matrix"] != first["confusion_matrix"]


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_a_smaller_limit_leaves_a_longer_runs_state_alone(tmp_path):
    """--limit 1 after three of four images were done called the state damaged and wrote over it: the three were
    lost, and the full command then refused the new state."""
    pairs = make_cityscapes(tmp_path, 4)
    out = tmp_path / "run.json"
    with pytest.raises(Interrupt):
        evaluate(counting_predict(N_CITY, [], 3), city_dataset(tmp_path), result_json=out, save_every=100)
    state = tmp_path / "run.json.state-rank0of1.npz"
    kept = state.read_bytes()
    with pytest.raises(ValueError, match=r"num_images \(--limit\) differ"):
        evaluate(fake_predict(N_CITY), city_dataset(tmp_path), result_json=out, limit=1, progress=False)
    assert state.read_bytes() == kept
    calls: list[int] = []
    result = evaluate(counting_predict(N_CITY, calls), city_dataset(tmp_path), result_json=out, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(np.array(result["confusion_matrix"]), hand_expected(pairs))


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_no_labelled_pixel_is_an_error_not_nan_metrics(tmp_path):
    """Every label ignored (255, or 0 under reduce_zero_label) gave mIoU NaN, null in the JSON, and exit 0."""
    pairs = make_cityscapes(tmp_path / "city", 2)
    for _, lab in pairs:
        write_label(lab, np.full(np.array(Image.open(lab)).shape, 255, np.uint8))
    with pytest.raises(ValueError, match="no labelled pixel in the 2 label maps") as e:
        evaluate(fake_predict(N_CITY), city_dataset(tmp_path / "city"), progress=False)
    assert "reduce_zero_label" not in str(e.value)
    make_voc(tmp_path / "voc", [np.zeros((6, 8), np.uint8)] * 2)
    with pytest.raises(ValueError, match="no labelled pixel.*or 0 under this preset's reduce_zero_label"):
        evaluate(fake_predict(20), build_dataset("voc20", tmp_path / "voc"), progress=False)
    make_voc(tmp_path / "voc1", [np.zeros((6, 8), np.uint8), np.full((6, 8), 3, np.uint8)])  # one labelled image
    assert evaluate(fake_predict(20), build_dataset("voc20", tmp_path / "voc1"), progress=False)["aAcc"] is not None


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_damaged_images_labels_and_split_files_are_named(tmp_path):
    """A cut JPEG was scored as the grey OpenCV fills it with (exit 0); a cut or damaged label PNG and a split
    file that is not UTF-8 gave errors that named no file; a byte-order mark became part of the first name."""
    labels = [np.full((16, 16), k, np.uint8) for k in (1, 2)]
    pairs = make_voc(tmp_path, labels)
    split = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())
    assert build_dataset("voc21", tmp_path).names == [img.stem for img, _ in pairs]
    image, label = pairs[1]
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=f"{image.name}.*does not decode completely"):
        evaluate(fake_predict(21), build_dataset("voc21", tmp_path), progress=False)
    image.write_bytes(whole)
    png = bytearray(label.read_bytes())
    idat = png.index(b"IDAT")
    png[idat + 6] ^= 0xFF  # a byte inside the image data: its chunk's CRC no longer matches
    label.write_bytes(bytes(png))
    with pytest.raises(ValueError, match=f"{label.name}.*a label map: extract or convert it again"):
        evaluate(fake_predict(21), build_dataset("voc21", tmp_path), progress=False)
    label.write_bytes(bytes(png[:40]))
    with pytest.raises(ValueError, match=f"{label.name}"):
        evaluate(fake_predict(21), build_dataset("voc21", tmp_path), progress=False)
    split.write_bytes(b"2007_000000\n\xe9t\xe9\n")
    with pytest.raises(ValueError, match=f"split file {split} is not UTF-8 text"):
        build_dataset("voc21", tmp_path)


@pytest.mark.filterwarnings(NOT_OFFICIAL)
def test_sigterm_saves_the_images_done_and_ends_the_command_with_143(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM ended the process at once: the images done since the last periodic save were lost."""
    import signal

    from trident_core import cli

    make_cityscapes(tmp_path, 4)
    out = tmp_path / "run.json"
    calls: list[int] = []
    inner = counting_predict(N_CITY, calls)

    def predict(rgb: np.ndarray) -> np.ndarray:
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(rgb)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Terminated), cli._sigterm_as_interrupt():
        evaluate(predict, city_dataset(tmp_path), result_json=out, save_every=100, progress=False)
    assert signal.getsignal(signal.SIGTERM) is before
    with np.load(tmp_path / "run.json.state-rank0of1.npz") as data:
        assert data["done"].tolist() == [0, 1]

    def killed(_args: argparse.Namespace) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(cli, "cmd_eval", killed)
    assert cli.main(["eval", "--preset", "voc21", "--data-root", str(tmp_path), "--out", str(out)]) == 143
    assert "terminated (SIGTERM): the images done are kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
