"""End to end: small random models through every option, and one full-size run (CLIP ViT-B/16, DINO ViT-B/16,
SAM ViT-B) on a 448-pixel image with and without refinement."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trident_core import ClassList, Params, Trident, parse_classes
from trident_core.aggregation import splice_and_aggregate
from trident_core.classify import classify
from trident_core.config import AggregateConfig, ClassifyConfig, RefineConfig
from trident_core.pipeline import compute_feature_map, compute_window_features, encode_image
from trident_core.refine import refine


@pytest.mark.parametrize("correlation", ["affinity", "attention", "cosine", "none"])
def test_correlation_modes(small_trident, photo, correlation):
    seg = small_trident.segment(photo[:256, :384], "sky, person, flag", Params().update(correlation=correlation))
    assert tuple(seg.labels.shape) == (256, 384) and torch.isfinite(seg.probs).all()
    assert torch.allclose(seg.probs.sum(0), torch.ones(256, 384), atol=1e-4)


def test_paradigms_differ_and_stts_averages_window_logits(small_trident, photo):
    img = photo[:336, :512]
    p = Params().update(short_side=336)  # the processed image is the image itself: a 1x2 window grid, 21x32 tokens
    wf = compute_window_features(small_trident.clip, small_trident.dino, img, p.windows)
    fm = compute_feature_map(wf, small_trident.clip, None, None, AggregateConfig(paradigm="segment_then_splice"))
    # independent formulation: classify each window's tokens on their own, then average the logits per token
    text = small_trident.text(parse_classes("sky, person"))
    v = small_trident.clip.model.visual
    per_window = F.normalize((v.ln_post(wf.tokens) @ v.proj), dim=-1) @ text.T  # [n, 441, 2]
    total = torch.zeros(2, 21, 32)
    count = torch.zeros(21, 32)
    for lg, (y1, x1, _, _) in zip(per_window, wf.plan.boxes):
        total[:, y1 // 16:y1 // 16 + 21, x1 // 16:x1 // 16 + 21] += lg.T.reshape(2, 21, 21)
        count[y1 // 16:y1 // 16 + 21, x1 // 16:x1 // 16 + 21] += 1
    got = torch.einsum("qe,ehw->qhw", text, fm.features)
    assert torch.allclose(got, total / count, atol=1e-5)
    encodings = encode_image(small_trident.sam, img, p.aggregation)
    sts = compute_feature_map(wf, small_trident.clip, small_trident.sam, encodings, p.aggregation)
    assert sts.features.shape[1:] != fm.features.shape[1:] or not torch.allclose(sts.features, fm.features)


def test_tiles_block_diagonal_equals_per_tile(small_trident, photo):
    wide = np.concatenate([photo, photo[:, ::-1]], axis=1)
    wf = compute_window_features(small_trident.clip, small_trident.dino, wide, Params().windows)
    sam = small_trident.sam
    halves = encode_image(sam, wide, AggregateConfig(sam_tiles="1x2"))
    assert halves.tiling.shape == (1, 2) and halves.whole is None
    fm = splice_and_aggregate(wf, small_trident.clip, sam, halves, AggregateConfig(sam_tiles="1x2"))
    assert fm.tiles == (1, 2) and tuple(fm.features.shape[1:]) == (64, 128)
    auto = AggregateConfig(sam_tiles="auto")  # 1x2 for this 512x1024 image
    assert torch.equal(splice_and_aggregate(wf, small_trident.clip, sam, encode_image(sam, wide, auto), auto).features,
                       fm.features)
    whole = splice_and_aggregate(wf, small_trident.clip, sam, encode_image(sam, wide, AggregateConfig()),
                                 AggregateConfig(sam_tiles="1x1"))
    assert tuple(whole.features.shape[1:]) == (32, 64)
    with pytest.raises(ValueError, match="connect the image that was segmented"):
        splice_and_aggregate(wf, small_trident.clip, sam, encode_image(sam, photo, AggregateConfig()),
                             AggregateConfig())


def test_refinement_modes_and_rejection(small_trident, photo):
    cl = parse_classes("sky, person, flag")
    seg = small_trident.segment(photo, cl, Params())
    kept = refine(seg, small_trident.sam, photo, RefineConfig(iou_thresh=0.0, minimal_area=100))
    assert kept.refined and kept.info["regions_kept"] > 0 and kept.info["regions_rejected"] == 0
    assert torch.equal(kept.labels_coarse, seg.labels)
    none = refine(seg, small_trident.sam, photo, RefineConfig(iou_thresh=1.0, minimal_area=100))
    assert none.info["regions_kept"] == 0 and torch.equal(none.labels, seg.labels)
    assert torch.equal(none.probs, seg.probs)
    batched = refine(seg, small_trident.sam, photo, RefineConfig(iou_thresh=0.0, minimal_area=100,
                                                                  mask_prompt_mode="batched"))
    assert batched.info["regions_kept"] == kept.info["regions_kept"]
    # labels change only inside kept masks: where the refined score map equals the coarse one, labels stay
    same = (kept.probs == seg.probs).all(dim=0)
    assert torch.equal(kept.labels[same], seg.labels[same])


def test_no_hook_is_ever_registered(small_trident, photo, monkeypatch):
    """The stages call the models' modules directly: segmenting with refinement registers no forward hook, on a
    module or globally (so none can be left behind)."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a forward hook was registered")

    for name in ("register_forward_hook", "register_forward_pre_hook"):
        monkeypatch.setattr(torch.nn.Module, name, refuse)
    for name in ("register_module_forward_hook", "register_module_forward_pre_hook"):
        monkeypatch.setattr(torch.nn.modules.module, name, refuse)
    seg = small_trident.segment(photo[:200, :200], "sky, person", Params(refine=True))
    assert seg.refined


@pytest.fixture(scope="module")
def image448(photo):
    return cv2.resize(photo, (448, 448), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("refine_on", [False, True])
def test_full_size_end_to_end(full_trident, image448, refine_on):
    cl = parse_classes("sky, person, flag, rocket")
    seg = full_trident.segment(image448, cl, Params(refine=refine_on))
    assert tuple(seg.grid_logits.shape) == (4, 64, 64)
    assert tuple(seg.labels.shape) == (448, 448) and tuple(seg.probs.shape) == (4, 448, 448)
    assert torch.isfinite(seg.probs).all() and torch.isfinite(seg.grid_logits).all()
    assert seg.refined == refine_on
    if refine_on:
        assert seg.info["regions_kept"] + seg.info["regions_rejected"] > 0


def test_full_size_every_class_can_win(full_trident, image448):
    """Text embeddings equal to the features of four chosen tokens: each class must win at its token."""
    img = image448
    p = Params()
    wf = compute_window_features(full_trident.clip, full_trident.dino, img, p.windows)
    encodings = encode_image(full_trident.sam, img, p.aggregation)
    fm = compute_feature_map(wf, full_trident.clip, full_trident.sam, encodings, p.aggregation)
    picks = [(5, 5), (5, 58), (58, 5), (58, 58)]
    text = torch.stack([fm.features[:, y, x] for y, x in picks])
    seg = classify(fm, text, parse_classes("a, b, c, d"), ClassifyConfig(logit_scale=40.0, prob_thd=0.0))
    for c, (y, x) in enumerate(picks):
        assert seg.labels[y * 7 + 3, x * 7 + 3] == c


def test_half_resolution_maps_class_by_class_equal_the_whole_interpolation():
    """refine's per-class half-resolution probability (no [C, H/2, W/2] copy) is the whole tensor's bilinear
    interpolation, channel for channel, bit for bit (odd sizes included)."""
    from trident_core.refine import _half

    probs = torch.rand(7, 121, 90, generator=torch.Generator().manual_seed(3)).softmax(dim=0)
    half = (121 // 2, 90 // 2)
    whole = F.interpolate(probs[None], half, mode="bilinear", align_corners=False)[0]
    assert all(torch.equal(_half(probs[k], half), whole[k]) for k in range(7))


def test_refinement_without_a_kept_mask_makes_no_full_size_maps(small_trident, photo, monkeypatch):
    """Where no mask passes, the refinement allocates no [C, H, W] refined map (247 MB for 59 classes at 1024x1024):
    the coarse maps stand."""
    import trident_core.refine as refine_module

    seg = small_trident.segment(photo, "sky, person, tree", Params())
    made = []
    real = torch.zeros_like
    monkeypatch.setattr(refine_module.torch, "zeros_like", lambda t, **kw: made.append(t.shape) or real(t, **kw))
    none = refine(seg, small_trident.sam, photo, RefineConfig(iou_thresh=1.0, minimal_area=100))
    assert none.info["regions_rejected"] > 0 and none.probs is seg.probs and not made
    kept = refine(seg, small_trident.sam, photo, RefineConfig(iou_thresh=0.0, minimal_area=100))
    assert kept.info["regions_kept"] > 0 and made == [seg.probs.shape]


def test_the_library_takes_class_lists_as_lists_and_refuses_one_image_to_segment_frames(small_trident, tmp_path):
    """A list of class names was an AttributeError deep in text.py; one image given to segment_frames was iterated
    row by row (64 "frames" of 80x3 pixels); a string path character by character."""
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    by_text = small_trident.segment(img, "sky, grass")
    by_list = small_trident.segment(img, ["sky", "grass"])
    assert torch.equal(by_text.labels, by_list.labels) and by_list.classes.names == ["sky", "grass"]
    assert torch.equal(small_trident.text("sky, grass"), small_trident.text(["sky", "grass"]))
    Image.fromarray(img).save(tmp_path / "a.png")
    for one in (img, torch.from_numpy(img), str(tmp_path / "a.png"), tmp_path / "a.png", Image.fromarray(img)):
        with pytest.raises(ValueError, match="segment_frames takes several images .* for one image use segment"):
            list(small_trident.segment_frames(one, "sky, grass"))
    frames = list(small_trident.segment_frames(img[None], ["sky", "grass"]))
    assert len(frames) == 1 and torch.equal(frames[0].labels, by_text.labels)


@pytest.mark.parametrize(("call", "said"), [
    (lambda t, img: t.segment(img, "sky, grass", None), "params must be a trident_core.Params"),
    (lambda t, img: t.segment(img, "sky, grass", {"refine": True}), "params must be a trident_core.Params"),
    (lambda t, img: t.segment(img, "sky, grass", Params(), "log"), "progress must be a function"),
    (lambda t, img: t.segment(img, 5), "classes must be typed text .* or a list of names"),
    (lambda t, img: t.segment(img, ["sky", 3]), "classes must be typed text .* or a list of names"),
    (lambda t, img: t.text(None), "classes must be typed text"),
    (lambda t, img: t.segment(img, ClassList((("sky",),))), "one class .* would label every pixel"),
    (lambda t, img: list(t.segment_frames([img, img], "sky, grass", per_forward="2")), "per_forward must be a whole"),
    (lambda t, img: list(t.segment_frames([img, img], "sky, grass", per_forward=2.5)), "per_forward must be a whole"),
    (lambda t, img: list(t.segment_frames([img, img], "sky, grass", per_forward=0)), "per_forward must be a whole"),
    (lambda t, img: list(t.segment_frames([img, img], "sky, grass", None)), "params must be"),
], ids=["params-none", "params-dict", "progress-str", "classes-int", "classes-mixed", "text-none",
        "one-class-list", "per-forward-str", "per-forward-float", "per-forward-0", "frames-params-none"])
def test_library_arguments_of_the_wrong_kind_are_one_line(small_trident, call, said):
    """None, dicts and strings where the library takes Params, a function or a frame count were Python errors deep
    inside (AttributeError: 'NoneType' object has no attribute 'classification', '<=' not supported ...)."""
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    with pytest.raises((TypeError, ValueError), match=said):
        call(small_trident, img)


def test_per_forward_takes_numpy_whole_numbers(small_trident):
    """A frame count from numpy (np.int64) is a whole number: the same frames as one at a time."""
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    got = list(small_trident.segment_frames([img, img], "sky, grass", per_forward=np.int64(2)))
    assert len(got) == 2 and torch.equal(got[0].labels, small_trident.segment(img, "sky, grass").labels)


def test_from_files_refuses_a_path_of_the_wrong_kind(small_ckpts):
    with pytest.raises(TypeError, match="cache must be a file path"):
        Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], cache=3)
    with pytest.raises(TypeError, match="clip must be a file path"):
        Trident.from_files(None, small_ckpts["dino"])
