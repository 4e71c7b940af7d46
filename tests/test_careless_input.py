"""Careless input gets one clear line, never a silent wrong result: parameter ranges (library, CLI, nodes),
images and SAMs that are not the ones a stage's result came from, empty IMAGE batches, output paths that cannot
be written (refused before any computing), eval resume states of another run, class files with a BOM and comments."""

from __future__ import annotations

import argparse
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_nodes
import torch
from factory import small_sam_state
from PIL import Image
from test_nodes import core, run

from trident_core import Params
from trident_core.classes import read_class_file
from trident_core.cli import classes_from_args, main
from trident_core.windows import plan_windows

models, loaded, images = test_nodes.models, test_nodes.loaded, test_nodes.images  # the node tests' fixtures


def _cli(capsys, *args: str) -> tuple[int, list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(list(args))
    return rc, capsys.readouterr().err.strip().splitlines()


def _model_args(ckpts) -> list[str]:
    return ["--clip", str(ckpts["clip"]), "--dino", str(ckpts["dino"]), "--sam", str(ckpts["sam"]), "--no-download",
            "--device", "cpu"]


@pytest.fixture
def png(tmp_path, photo) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(photo[:96, :160]).save(path)
    return path


# ----------------------------------------------------------------------------------------- parameter ranges

@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("stride", 337, "from 16 to 336"), ("stride", 0, "from 16 to 336"), ("stride", 1, "from 16 to 336"),
    ("short_side", 0, "from 32 to 8192"),
    ("short_side", -448, "from 32 to 8192"), ("short_side", 1, "from 32 to 8192"), ("prob_thd", math.nan, "0 to 1"),
    ("logit_scale", 0.0, "from 1e-06"), ("iou_thresh", 1.5, "from 0 to 1"), ("minimal_area", -1, "from 0"),
])
def test_params_refuse_values_out_of_range(field, value, allowed):
    with pytest.raises(ValueError) as e:
        Params().update(**{field: value})
    message = str(e.value)
    assert message.startswith(f"{field}={value!r} is out of range") and allowed in message and "\n" not in message


def test_a_stride_up_to_the_window_leaves_no_gap():
    """The property the range protects: every pixel lies in some window exactly when stride <= window."""
    for stride in (224, 336):
        plan = plan_windows((500, 700), 336, stride)
        covered = np.zeros((500, 700), bool)
        for y1, x1, y2, x2 in plan.boxes:
            covered[y1:y2, x1:x2] = True
        assert covered.all() and Params().update(stride=stride).windows.stride == stride
    with pytest.raises(ValueError, match="gaps"):
        plan_windows((500, 700), 336, 400)


@pytest.mark.parametrize("option", [["--stride", "400"], ["--short-side", "0"], ["--short-side", "-5"],
                                    ["--short-side", "1"]])
def test_cli_refuses_meaningless_parameters_in_one_line(small_ckpts, png, tmp_path, capsys, option):
    rc, err = _cli(capsys, "segment", str(png), "--classes", "sky, person", "--save-npz", str(tmp_path / "o.npz"),
                   *option, *_model_args(small_ckpts))
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {option[0][2:].replace('-', '_')}="), err
    assert "out of range" in err[0] and not (tmp_path / "o.npz").exists()


def test_window_features_node_refuses_a_stride_over_the_window(loaded, images):
    clip, dino, _ = loaded
    with pytest.raises(ValueError, match="stride=400 is out of range.*16 to 336"):
        run("TridentWindowFeatures", image=images, clip=clip, dino=dino, short_side=448, window=336, stride=400)


# ------------------------------------------------------------------------------- images and SAMs that differ

@pytest.fixture(scope="module")
def tiled(loaded, images):
    """A coarse segmentation made with SAM tiles 1x2."""
    clip, dino, sam = loaded
    (segs,) = run("TridentSegment", image=images[:1], clip=clip, dino=dino, sam=sam, classes="sky, person",
                  preset="default", refine=False, sam_tiles="1x2")
    return segs


def test_stage_results_of_one_image_are_refused_with_another_image_of_its_size(loaded, images):
    """Window features, SAM encodings and coarse segmentations of image A given image B of the same size: mixed
    without a word before (the feature maps differed by up to 0.93, 16 % of the refined labels moved)."""
    clip, dino, sam = loaded
    a, b = images[:1], images[1:2]
    assert a.shape == b.shape and not torch.equal(a, b)
    (wf,) = run("TridentWindowFeatures", image=a, clip=clip, dino=dino, short_side=448, window=336, stride=224)
    aggregate = dict(correlation="affinity", paradigm="splice_then_segment", sam_tiles="1x1", cos_fac=1.2,
                     refine_neg_cos=True, sam=sam)
    with pytest.raises(ValueError, match="made from two different images of the same size: connect the same image "
                                         "to Window Features and Splice & Aggregate"):
        run("TridentSpliceAggregate", window_features=wf, image=b, **aggregate)
    fm, enc = run("TridentSpliceAggregate", window_features=wf, image=a, **aggregate)
    (classes,) = run("TridentEncodeClasses", clip=clip, classes="sky, person")
    with pytest.raises(ValueError, match="not the one the feature map was made from"):
        run("TridentClassify", feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0, image=b,
            pamr_steps=1)
    with pytest.raises(ValueError, match="the image is 96x64 pixels but the feature map was made from a 192x64"):
        run("TridentClassify", feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0, image=a[:, :, :96],
            temporal_smoothing=0.5)  # (another size: said so, not "another image of the same size")
    (coarse,) = run("TridentClassify", feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0)
    refine = dict(coarse_thresh=0.2, minimal_area=225, mask_alpha=0.005, iou_thresh=0.8, mask_prompt_mode="reference")
    with pytest.raises(ValueError, match="not the one the segmentation was made from"):
        run("TridentSamRefine", segmentation=coarse, sam=sam, image=b, **refine)
    (fm_b, enc_b) = run("TridentSpliceAggregate", window_features=run("TridentWindowFeatures", image=b, clip=clip,
                        dino=dino, short_side=448, window=336, stride=224)[0], image=b, **aggregate)
    with pytest.raises(ValueError, match="not the one the SAM encoding was made from"):
        run("TridentSamRefine", segmentation=coarse, sam=sam, image=a, sam_encoding=enc_b, **refine)
    (refined,) = run("TridentSamRefine", segmentation=coarse, sam=sam, image=a, sam_encoding=enc, **refine)
    assert refined[0].refined
    point = dict(sam=sam, x=0.5, y=0.5, units="fraction", correlation="affinity", cos_fac=1.2, refine_neg_cos=True)
    with pytest.raises(ValueError, match="not the one the feature map was made from"):
        run("TridentInspectPointAffinity", feature_map=fm, image=b, **point)
    with pytest.raises(ValueError, match="SAM encoding is of another image than the feature map's"):
        run("TridentInspectPointAffinity", feature_map=fm, sam_encoding=enc_b, **point)
    assert run("TridentInspectPointAffinity", feature_map=fm, image=a, **point)[1].shape == (1, 64, 192)


def test_sam_refine_refuses_an_image_of_another_size(loaded, images, tiled):
    _, _, sam = loaded
    other = images[:1, :, :96]
    with pytest.raises(ValueError) as e:
        run("TridentSamRefine", segmentation=tiled, sam=sam, image=other, coarse_thresh=0.2, minimal_area=225,
            mask_alpha=0.005, iou_thresh=0.8, mask_prompt_mode="reference")
    message = str(e.value)
    assert "96x64" in message and "192x64" in message and "connect the image that was segmented" in message


@pytest.fixture(scope="module")
def other_sam(tmp_path_factory, models):
    """A SAM of another size (encoder width 32) in the models folder."""
    from segment_anything.build_sam import _build_sam

    m = _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=1, encoder_global_attn_indexes=[1],
                   checkpoint=None)
    sd = small_sam_state()
    sd.update({k: v for k, v in m.state_dict().items() if k.startswith("image_encoder.")})
    torch.save(sd, models / "sams" / "sam_other.pth")
    (handle,) = run("TridentLoadSAM", model_name="sam_other.pth", precision="fp32", allow_download=False)
    yield handle
    (models / "sams" / "sam_other.pth").unlink()


def _feature_map(loaded, image, paradigm: str) -> tuple[list, list]:
    """Window Features then Splice & Aggregate with the default parameters: feature maps and SAM encodings."""
    clip, dino, sam = loaded
    (wf,) = run("TridentWindowFeatures", image=image, clip=clip, dino=dino, short_side=448, window=336, stride=224)
    return run("TridentSpliceAggregate", window_features=wf, sam=sam, image=image, correlation="affinity",
               paradigm=paradigm, sam_tiles="1x1", cos_fac=1.2, refine_neg_cos=True)


def test_a_sam_of_another_size_is_refused_by_refine_and_inspect(loaded, images, other_sam):
    """Splice & Aggregate's SAM encoding is reused by SAM Refine and Inspect Point Affinity only with the SAM that
    made it."""
    clip = loaded[0]
    fm, encodings = _feature_map(loaded, images[:1], "splice_then_segment")
    (classes,) = run("TridentEncodeClasses", clip=clip, classes="sky, person")
    (segs,) = run("TridentClassify", feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0)
    with pytest.raises(ValueError) as e:
        run("TridentSamRefine", segmentation=segs, sam=other_sam, image=images[:1], coarse_thresh=0.2,
            minimal_area=225, mask_alpha=0.005, iou_thresh=0.8, mask_prompt_mode="reference", sam_encoding=encodings)
    assert "vit_64x2" in str(e.value) and "vit_32x2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="made with SAM vit_64x2.*vit_32x2.*connect the SAM that made it"):
        run("TridentInspectPointAffinity", feature_map=fm, sam=other_sam, x=0.5, y=0.5, units="fraction",
            correlation="affinity", cos_fac=1.2, refine_neg_cos=True, sam_encoding=encodings)


def test_inspect_point_affinity_refuses_an_image_of_another_size_and_a_nan_point(loaded, images):
    sam = loaded[2]
    fm, _ = _feature_map(loaded, images[:1], "segment_then_splice")
    with pytest.raises(ValueError, match="190x64 pixels but the feature map was made from a 192x64 image"):
        run("TridentInspectPointAffinity", feature_map=fm, sam=sam, x=0.5, y=0.5, units="fraction",
            correlation="affinity", cos_fac=1.2, refine_neg_cos=True, image=images[:1, :, :190])
    for x, y in ((math.nan, 0.5), (0.5, math.inf)):
        with pytest.raises(ValueError, match="not a finite number"):
            run("TridentInspectPointAffinity", feature_map=fm, sam=sam, x=x, y=y, units="fraction",
                correlation="affinity", cos_fac=1.2, refine_neg_cos=True, image=images[:1])


# ------------------------------------------------------------------------------------ empty IMAGE batches

def test_an_image_batch_of_zero_images_is_one_line(loaded, images):
    clip, dino, sam = loaded
    empty = images[:0]
    with pytest.raises(ValueError, match="IMAGE batch of 0 images"):
        run("TridentSegment", image=empty, clip=clip, dino=dino, sam=sam, classes="sky, grass", preset="default",
            refine=False, sam_tiles="preset")
    with pytest.raises(ValueError, match="IMAGE batch of 0 images"):
        run("TridentSegmentationToMasks", segmentation=[], classes="", invert=False)
    (segs,) = run("TridentSegment", image=images[:1], clip=clip, dino=dino, sam=sam, classes="sky, person",
                  preset="default", refine=False, sam_tiles="preset")
    with pytest.raises(ValueError, match="IMAGE batch of 0 images"):
        run("TridentPreviewSegmentation", segmentation=segs, image=empty, alpha=0.5, show_legend=True)
    with pytest.raises(ValueError, match="IMAGE batch of 0 images"):
        run("TridentInspectClassProbability", segmentation=[], class_name="sky", coarse=False)
    with pytest.raises(ValueError, match="IMAGE batch of 0 images"):
        run("TridentInspectFeatures", feature_map=[])
    with pytest.raises(ValueError, match="IMAGE batch of 0 images"):
        run("TridentInspectPointAffinity", feature_map=[], sam=sam, x=0.5, y=0.5, units="fraction",
            correlation="affinity", cos_fac=1.2, refine_neg_cos=True, image=empty)


# ---------------------------------------------------------------------------- output paths, checked first

def test_segment_out_that_cannot_be_written_fails_before_computing(small_ckpts, png, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"keep me")
    for args in (["--out", str(blocker)], ["--out", str(blocker / "sub")], ["--save-npz", str(blocker / "r.npz")],
                 ["--out", "/proc/trident_out"]):
        rc, err = _cli(capsys, "segment", str(png), "--classes", "sky, grass", *args, *_model_args(small_ckpts))
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {args[0]} ") and args[1] in err[0], err
    assert blocker.read_bytes() == b"keep me"


def test_eval_out_naming_a_folder_fails_before_computing(small_ckpts, tmp_path, capsys):
    rc, err = _cli(capsys, "eval", "--preset", "city_scapes", "--data-root", str(tmp_path / "nodata"), "--out",
                   str(tmp_path), *_model_args(small_ckpts))
    expected = f"error: --out {tmp_path} is a folder; give a file name, e.g. {tmp_path / 'result.json'}"
    assert rc == 2 and err == [expected]


def test_a_cache_folder_that_is_a_file_is_one_line(png, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"")
    monkeypatch.setenv("TRIDENT_CACHE", str(blocker))
    rc, err = _cli(capsys, "segment", str(png), "--classes", "sky, grass", "--out", str(tmp_path / "o"),
                   "--no-download")
    assert rc == 2 and len(err) == 1 and f"{blocker} is a file, not a folder" in err[0] and "TRIDENT_CACHE" in err[0]


# ---------------------------------------------------------------------------- eval resume of another run

def _tiny_cityscapes(root: Path, photo: np.ndarray) -> None:
    stem = "aachen/aachen_000000_000019"
    img = root / "cityscapes/leftImg8bit/val" / f"{stem}_leftImg8bit.png"
    lab = root / "cityscapes/gtFine/val" / f"{stem}_gtFine_labelTrainIds.png"
    img.parent.mkdir(parents=True)
    lab.parent.mkdir(parents=True)
    Image.fromarray(photo[:64, :128]).save(img)
    Image.fromarray(np.random.default_rng(0).integers(0, 19, (64, 128)).astype(np.uint8)).save(lab)


def test_eval_resume_refuses_the_state_of_a_run_with_another_model_file(small_ckpts, photo, tmp_path, capsys):
    """The same path, other weights: the stored result is not returned as if it were this run's."""
    import shutil

    _tiny_cityscapes(tmp_path / "data", photo)
    sam = tmp_path / "sam.pth"
    shutil.copy(small_ckpts["sam"], sam)
    args = ["eval", "--preset", "city_scapes", "--data-root", str(tmp_path / "data"), "--out",
            str(tmp_path / "r.json"), *_model_args({**small_ckpts, "sam": sam})]
    assert _cli(capsys, *args)[0] == 0
    assert _cli(capsys, *args)[0] == 0  # the same run resumes (nothing left to do)
    torch.save(small_sam_state(seed=7), sam)
    rc, err = _cli(capsys, *args)
    errors = [line for line in err if line.startswith("error: ")]
    assert rc == 2 and errors == err[-1:] and "is from a different run (config: sam_sha256 differ)" in err[-1]
    assert "--no-resume" in err[-1]


# ---------------------------------------------------------------------------------------------- class files

def test_class_files_skip_the_byte_order_mark_and_comment_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeff# my classes\nsky\n  # a comment\n\nhorse; pony\n".encode())
    assert read_class_file(str(path)) == ["sky", "horse; pony"]
    args = argparse.Namespace(classes=str(path), preset="default", background=None)
    assert classes_from_args(args).classes == (("sky",), ("horse", "pony"))
    path.write_bytes(b"\xef\xbb\xbf# only a comment\n")
    with pytest.raises(ValueError, match=f"class file {path} holds no class names"):
        read_class_file(str(path))
    path.write_bytes(b"\xff\xfes\x00k\x00y\x00")  # UTF-16
    with pytest.raises(ValueError, match=f"class file {path} is not UTF-8 text"):
        read_class_file(str(path))


@pytest.mark.parametrize("typed", ["my_classes.txt", "lists/classes", "lists\\classes.TXT"])
def test_a_misspelt_class_file_is_not_taken_for_a_class_name(typed, tmp_path, monkeypatch):
    """A class file that does not exist was one class named by its path (with voc21, beside the background)."""
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(classes=typed, preset="voc21", background=None)
    with pytest.raises(ValueError, match=f"--classes {re.escape(typed)}: no such class file; give a text file"):
        classes_from_args(args)
    args.classes = "cup/mug, plate"  # names with a slash, typed as a list, stay names
    assert classes_from_args(args).names[-2:] == ["cup/mug", "plate"]


def test_a_lone_frame_or_channels_first_tensor_is_no_image_batch(loaded, images):
    """[H, W, C] (the batch dimension lost) or [B, C, H, W] would run as rows of gray images: refused."""
    clip, dino, sam = loaded
    for wrong in (images[0], images[:1].permute(0, 3, 1, 2)):
        with pytest.raises(ValueError, match="not an IMAGE batch"):
            run("TridentSegment", image=wrong, clip=clip, dino=dino, sam=sam, classes="sky, grass", preset="default",
                refine=False, sam_tiles="preset")


def test_splice_names_the_image_that_differs_from_the_window_features(loaded, images):
    clip, dino, sam = loaded
    (wf,) = run("TridentWindowFeatures", image=images[:1], clip=clip, dino=dino, short_side=448, window=336,
                stride=224)
    h, w = images.shape[1:3]
    with pytest.raises(ValueError, match=f"the image is {w - 2}x{h} but the window features were made from a "
                                         f"{w}x{h} image"):
        run("TridentSpliceAggregate", window_features=wf, sam=sam, image=images[:1, :, :w - 2],
            correlation="affinity", paradigm="splice_then_segment", sam_tiles="1x1", cos_fac=1.2,
            refine_neg_cos=True)


def test_point_affinity_names_a_batch_mismatch(loaded, images):
    fm, _ = _feature_map(loaded, images[:1], "segment_then_splice")
    with pytest.raises(ValueError, match="2 image\\(s\\) for a feature map of 1"):
        run("TridentInspectPointAffinity", feature_map=fm, sam=loaded[2], x=0.5, y=0.5, units="fraction",
            correlation="affinity", cos_fac=1.2, refine_neg_cos=True, image=torch.cat([images[:1]] * 2))


def test_image_batches_with_nan_or_0_to_255_values_are_refused_before_any_frame(loaded, images, monkeypatch):
    """A NaN in the last frame, or floats in 0..255 (nearly white once clipped), are refused before the first
    frame is segmented; a little overshoot above 1 is fine."""
    clip, dino, sam = loaded
    nan_last = images.clone()
    nan_last[-1, 0, 0, 0] = float("nan")
    pipeline = core("pipeline")
    monkeypatch.setattr(pipeline.Trident, "segment", lambda *a, **k: pytest.fail("a frame was segmented"))
    for bad, message in ((nan_last, "NaN"), (images[:2] * 255, "divide by 255")):
        with pytest.raises(ValueError, match=message):
            run("TridentSegment", image=bad, clip=clip, dino=dino, sam=sam, classes="sky, grass", preset="default",
                refine=False, sam_tiles="preset")
    to_rgb = core("image").to_rgb_uint8
    assert to_rgb(np.full((4, 4, 3), 1.2, np.float32)).max() == 255
    with pytest.raises(ValueError, match="divide by 255"):
        to_rgb(np.full((4, 4, 3), 200.0, np.float32))


def test_a_minus_one_to_one_image_empty_frames_and_meta_tensors_are_refused_in_one_line(loaded, images):
    """A -1..1 image was clipped to black in its darker half; empty frames and meta tensors gave a SAM tiling or
    a torch error."""
    clip, dino, sam = loaded
    to_rgb = core("image").to_rgb_uint8
    assert to_rgb(np.full((4, 4, 3), -0.1, np.float32)).max() == 0  # a little undershoot is fine
    with pytest.raises(ValueError, match=r"go down to -1.*\(x \+ 1\) / 2"):
        to_rgb(np.linspace(-1, 1, 48, dtype=np.float32).reshape(4, 4, 3))
    for bad, message in ((images[:1] * 2 - 1, r"\(x \+ 1\) / 2"), (images[:1, :0], "images are empty"),
                         (torch.empty(1, 8, 8, 3, device="meta"), "'meta' device")):
        with pytest.raises(ValueError, match=message):
            run("TridentSegment", image=bad, clip=clip, dino=dino, sam=sam, classes="sky, grass", preset="default",
                refine=False, sam_tiles="preset")


@pytest.fixture(scope="module")
def chain_fm(loaded, images):
    """A feature map of one image (no SAM) and encoded classes."""
    clip, dino, _ = loaded
    (classes,) = run("TridentEncodeClasses", clip=clip, classes="sky, person")
    (wf,) = run("TridentWindowFeatures", image=images[:1], clip=clip, dino=dino, short_side=448, window=336,
                stride=224)
    fm, _ = run("TridentSpliceAggregate", window_features=wf, image=images[:1], correlation="none",
                paradigm="segment_then_splice", sam_tiles="1x1", cos_fac=1.2, refine_neg_cos=True)
    return fm, classes


def test_classify_takes_only_an_image_batch(chain_fm, images):
    """A lone [H, W, C] frame into Classify was counted as H images ("the image batch has 64 image(s)")."""
    fm, classes = chain_fm
    with pytest.raises(ValueError, match=r"not an IMAGE batch \[batch, height, width, channels\]"):
        run("TridentClassify", feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0, image=images[0],
            pamr_steps=1)
