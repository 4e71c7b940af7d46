"""A batch of frames through the nodes: the same labels as one frame at a time, outputs that grow per frame only by
what they must hold (labels), each frame's intermediates freed before the next, the text encoded once."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import test_nodes
import torch
from test_nodes import CLASSES, as_image, core, run

models, loaded = test_nodes.models, test_nodes.loaded  # the node tests' fixtures

H, W = 64, 192


@pytest.fixture(scope="module")
def frames(photo) -> torch.Tensor:
    """Eight different 64x192 frames of the photograph."""
    return as_image(*[photo[40 * i:40 * i + H, 30 * i:30 * i + W] for i in range(8)])


def reachable_tensor_bytes(obj: object, seen: set | None = None) -> int:
    """Bytes of every tensor storage (and numpy array) reachable from `obj`, each storage counted once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = ("storage", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(reachable_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(reachable_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(reachable_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def segment(loaded, frames, refine: bool):
    clip, dino, sam = loaded
    return run("TridentSegment", image=frames, clip=clip, dino=dino, sam=sam, classes=CLASSES, preset="default",
               refine=refine, sam_tiles="preset")[0]


@pytest.mark.parametrize("refine", [False, True])
def test_batch_equals_one_frame_at_a_time(loaded, frames, refine):
    """Labels bit for bit as trident_core gives them for each frame alone; probabilities rebuilt from the logits
    bit for bit, refined scores within float16's rounding."""
    clip, dino, sam = loaded
    trident = core("pipeline").Trident(clip.model, dino.model, sam.model)
    params = core("config").Params(refine=refine)
    segs = segment(loaded, frames[:3], refine)
    for seg, frame in zip(segs, frames[:3]):
        alone = trident.segment(frame, CLASSES, params)
        assert seg.labels.dtype == torch.int8 and torch.equal(seg.labels.long(), alone.labels)
        assert seg.refined == refine
        assert torch.equal(seg.logits(), alone.logits())
        if refine:
            assert torch.equal(seg.probs_coarse, alone.probs_coarse)
            assert torch.equal(seg.labels_coarse.long(), alone.labels_coarse.long())
            assert torch.allclose(seg.probs, alone.probs, rtol=1e-3, atol=1e-7)
        else:
            assert torch.equal(seg.probs, alone.probs) and seg.probs_coarse is None and seg.labels_coarse is None


def test_output_grows_per_frame_only_by_the_labels(loaded, frames):
    """What Trident Segment's output holds for 8 frames minus 2 frames: 6 x the int8 labels and the small grid
    logits, not the full-size float32 maps or SAM's encoding (refined outputs: see the stage test below)."""
    small, big = segment(loaded, frames[:2], False), segment(loaded, frames, False)
    grid = big[0].grid_logits
    per_frame = H * W + grid.numel() * grid.element_size()
    assert reachable_tensor_bytes(big) - reachable_tensor_bytes(small) == 6 * per_frame


def test_each_frame_is_freed_before_the_next(loaded, frames, monkeypatch):
    """When frame k starts, no full Segmentation (with its SAM encoding) of an earlier frame is alive."""
    Trident = core("pipeline").Trident
    original, made, alive_at_start = Trident.segment, [], []

    def tracked(self, *args, **kwargs):
        gc.collect()
        alive_at_start.append(sum(r() is not None for r in made))
        seg = original(self, *args, **kwargs)
        made.append(weakref.ref(seg))
        return seg

    monkeypatch.setattr(Trident, "segment", tracked)
    segs = segment(loaded, frames[:3], True)
    gc.collect()
    assert len(made) == 3 and alive_at_start == [0, 0, 0] and all(r() is None for r in made)
    assert len(segs) == 3


def test_text_encoded_once_per_batch(loaded, frames, monkeypatch):
    clip, dino, sam = loaded
    clip_class = core("models").ClipModel
    calls = []
    original = clip_class.encode_prompts

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(clip_class, "encode_prompts", counted)
    run("TridentSegment", image=frames[:3], clip=clip, dino=dino, sam=sam, classes="meadow, kite flyer",
        preset="default", refine=False, sam_tiles="preset")
    assert len(calls) == 1  # 2 names x 80 prompts: one text-encoder call for the whole batch


def test_stage_nodes_and_refine_after_segment(loaded, frames):
    """SAM Refine reuses Splice & Aggregate's SAM encoding when connected, and on Trident Segment's unrefined output
    encodes the frames again: both give Trident Segment's refined labels; a refinement that keeps
    masks gives trident_core's labels bit for bit and holds per frame only the labels, the grid logits and the
    float16 scores."""
    clip, dino, sam = loaded
    (classes,) = run("TridentEncodeClasses", clip=clip, classes=CLASSES)
    (wf,) = run("TridentWindowFeatures", image=frames[:2], clip=clip, dino=dino, short_side=448, window=336,
                stride=224)
    fm, encodings = run("TridentSpliceAggregate", window_features=wf, sam=sam, image=frames[:2],
                        correlation="affinity", paradigm="splice_then_segment", sam_tiles="1x1", cos_fac=1.2,
                        refine_neg_cos=True)
    (coarse,) = run("TridentClassify", feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0)
    assert all(e.whole is not None for e in encodings)
    refine_args = dict(sam=sam, image=frames[:2], coarse_thresh=0.2, minimal_area=225, mask_alpha=0.005,
                       iou_thresh=0.8, mask_prompt_mode="reference")
    (staged,) = run("TridentSamRefine", segmentation=coarse, sam_encoding=encodings, **refine_args)
    (refined_after,) = run("TridentSamRefine", segmentation=segment(loaded, frames[:2], False), **refine_args)
    for a, b, c in zip(staged, refined_after, segment(loaded, frames[:2], True)):
        assert torch.equal(a.labels, c.labels) and torch.equal(b.labels, c.labels)
    (kept,) = run("TridentSamRefine", segmentation=coarse, **{**refine_args, "iou_thresh": 0.0, "minimal_area": 10})
    rp = core("config").RefineConfig(0.2, 10, 0.005, 0.0, "reference")
    to_rgb = core("image").to_rgb_uint8
    for seg, c, frame in zip(kept, coarse, frames[:2]):
        alone = core("refine").refine(c, sam.model, to_rgb(frame), rp)
        assert alone.info["regions_kept"] > 0 and not torch.equal(alone.probs, alone.probs_coarse)
        assert torch.equal(seg.labels.long(), alone.labels) and torch.equal(seg.probs_coarse, alone.probs_coarse)
        assert torch.equal(seg.labels_coarse.long(), alone.labels_coarse.long())
        assert torch.allclose(seg.probs, alone.probs, rtol=1e-3, atol=1e-7) and seg.stored_probs.dtype == torch.half
        assert reachable_tensor_bytes(seg) == H * W * (1 + 2 * len(seg.classes)) + reachable_tensor_bytes(
            seg.grid_logits)


def test_compact_labels_dtype_and_exact_probabilities(loaded, frames):
    compact = core("compact")
    assert compact.label_dtype(127) == torch.int8 and compact.label_dtype(128) == torch.int16
    assert compact.label_dtype(40000) == torch.int32
    clip, dino, sam = loaded
    trident = core("pipeline").Trident(clip.model, dino.model, sam.model)
    full = trident.segment(frames[0], CLASSES, core("config").Params().update(prob_thd=0.4))
    small = compact.compact(full, 40.0, 0.4)
    assert small.stored_probs is None and torch.equal(small.probs, full.probs)  # rebuilt from the logits, exactly
    assert (full.labels == -1).any() and torch.equal(small.labels.long(), full.labels)
    other = compact.compact(full, 30.0, 0.4)  # not the scale it was classified with: the map is stored
    assert other.stored_probs is not None and torch.allclose(other.probs, full.probs, rtol=1e-3, atol=1e-7)


def test_light_batch_nodes_show_progress_and_honour_cancel_per_frame(monkeypatch):
    """Segmentation to Masks, Inspect Class Probability and Inspect Features also go frame by frame through the
    progress bar and the Cancel check (a long video's PCA can be stopped)."""
    import sys

    bridge = sys.modules[test_nodes.import_pack().__name__ + ".nodes.comfy_bridge"]
    classify, classes_mod = core("classify"), core("classes")
    fm_cls = core("aggregation").FeatureMap
    cl = classes_mod.parse_classes("person, sky")
    segs = [classify.Segmentation(torch.randint(0, 2, (12, 16)), torch.rand(2, 12, 16), torch.zeros(2, 3, 4), cl,
                                  (12, 16)) for _ in range(3)]
    maps = [fm_cls(torch.rand(8, 3, 4), (12, 16), "splice_then_segment", "affinity", (1, 1)) for _ in range(3)]
    calls = {"TridentSegmentationToMasks": dict(segmentation=segs, classes="person", invert=False),
             "TridentInspectClassProbability": dict(segmentation=segs, class_name="sky", coarse=False),
             "TridentInspectFeatures": dict(feature_map=maps)}
    for node, inputs in calls.items():
        checks = []
        monkeypatch.setattr(bridge, "check_interrupt", lambda checks=checks: checks.append(1))
        out = run(node, **inputs)
        assert len(checks) == 3 and out[0].shape[0] == 3, node

        def cancel_second(count=[]):  # noqa: B006 (a counter across calls)
            count.append(1)
            if len(count) == 2:
                raise InterruptedError

        monkeypatch.setattr(bridge, "check_interrupt", cancel_second)
        with pytest.raises(InterruptedError):
            run(node, **inputs)
