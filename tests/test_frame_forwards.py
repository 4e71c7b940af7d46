"""Several frames per forward (a GPU's frame batches: `Trident.segment_frames`): each frame's result equals the one
it gets alone within float32's rounding, frames of another size start a new group, the hooks see the frames in
order; on the CPU one frame per forward, so the CPU path stays the reference's bit for bit."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import test_nodes
import torch
from test_nodes import as_image, core, run

from trident_core import Params, pipeline
from trident_core.devices import FRAME_BYTES, MAX_FRAMES_PER_FORWARD, frames_per_forward
from trident_core.kernels.sam_attention import query_band
from trident_core.models import SamModel
from trident_core.pipeline import compute_frame_window_features, compute_window_features, encode_frames
from trident_core.window_features import window_chunk

models, loaded = test_nodes.models, test_nodes.loaded  # the node tests' fixtures
CLASSES = "sky, person; astronaut, flag"


def _frames(photo: np.ndarray) -> list[np.ndarray]:
    """Frames of 64x96 pixels, two of 80x64 between them, then one more of 64x96."""
    a = [photo[30 * i:30 * i + 64, 20 * i:20 * i + 96] for i in range(4)]
    b = [photo[100 + 10 * i:180 + 10 * i, 50:114] for i in range(2)]
    return [a[0], a[1], a[2], b[0], b[1], a[3]]


def _agree(got, alone) -> None:
    """Labels equal (a tie may fall the other way under another batch's summation order: at most 0.1 %) and
    probabilities within float32's rounding."""
    assert got.image_size == alone.image_size
    assert (got.labels == alone.labels).float().mean() >= 0.999
    assert torch.allclose(got.probs, alone.probs, atol=2e-5)


@pytest.mark.parametrize(("refine", "tiles"), [(False, "1x1"), (True, "1x1"), (False, "1x2")])
def test_shared_forwards_equal_one_frame_at_a_time(small_trident, photo, monkeypatch, refine, tiles):
    frames = _frames(photo)
    params = Params().update(refine=refine, sam_tiles=tiles)
    batches = []
    encode_many = SamModel.encode_many
    monkeypatch.setattr(SamModel, "encode_many",
                        lambda self, imgs, *a: batches.append(len(imgs)) or encode_many(self, imgs, *a))
    seen = []
    got = list(small_trident.segment_frames(frames, CLASSES, params, after_classify=lambda s: seen.append(s) or s,
                                            per_forward=2))
    tiles_per_frame = 2 if tiles == "1x2" else 1
    assert batches == [n for n in (2, 1, 2, 1) for _ in range(tiles_per_frame)]  # groups: a a | a | b b | a
    assert len(got) == len(frames) and [s.image_size for s in seen] == [f.shape[:2] for f in frames]
    monkeypatch.undo()
    for seg, frame in zip(got, frames):
        _agree(seg, small_trident.segment(frame, CLASSES, params))


def test_windows_of_several_frames_keep_each_frames_own_similarity_mean(small_trident, photo, monkeypatch):
    """Chunks that mix two frames' windows (the proxy attention's mean is per frame): each frame's tokens as
    `compute_window_features` gives them alone. (A GPU's eight windows per frame per forward.)"""
    frames = _frames(photo)[:3]
    config = Params().windows
    monkeypatch.setattr(pipeline, "window_chunk", lambda _device: 8)
    together = compute_frame_window_features(small_trident.clip, small_trident.dino, frames, config)
    n, chunk = len(together[0].plan), 8 * len(frames)
    assert any(s // n != (min(len(frames) * n, s + chunk) - 1) // n for s in range(0, len(frames) * n, chunk))
    for wf, frame in zip(together, frames):
        alone = compute_window_features(small_trident.clip, small_trident.dino, frame, config)
        assert wf.tokens.shape == alone.tokens.shape and wf.token_grid == alone.token_grid
        assert torch.allclose(wf.tokens, alone.tokens, atol=1e-5)
        assert wf.tokens.untyped_storage().nbytes() == wf.tokens.nbytes  # its own memory, not the group's


def test_sam_encodes_frames_of_any_sizes_in_one_forward(small_trident, photo):
    sam = small_trident.sam
    images = [np.ascontiguousarray(photo[:64, :96]), np.ascontiguousarray(photo[50:130, 10:74])]
    for enc, image in zip(sam.encode_many(images), images):
        alone = sam.encode(image)
        assert (enc.input_size, enc.original_size) == (alone.input_size, alone.original_size)
        for name in ("q", "k", "v", "last_input"):
            a, b = getattr(enc, name), getattr(alone, name)
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), name
            assert a.untyped_storage().nbytes() == a.nbytes, name  # each encoding owns its tensors


def test_frames_per_forward_from_free_gpu_memory():
    cuda = torch.device("cuda")
    assert frames_per_forward(torch.device("cpu"), 10**12) == 1
    assert frames_per_forward(torch.device("mps"), 10**12) == 1
    assert frames_per_forward(cuda, 0) == 1
    assert frames_per_forward(cuda, 3 * FRAME_BYTES + 1) == 3
    assert frames_per_forward(cuda, 10**12) == MAX_FRAMES_PER_FORWARD
    assert frames_per_forward(cuda, 4 * FRAME_BYTES, tiles=2) == 2  # each SAM tile of a frame is a share


@pytest.mark.parametrize(("update", "tiles"), [({}, 1), ({"sam_tiles": "1x2"}, 2), ({"sam_tiles": "auto"}, 2),
                                               ({"paradigm": "segment_then_splice", "sam_tiles": "1x2"}, 1)])
def test_the_frames_sam_tiles_count_in_the_choice(small_trident, monkeypatch, update, tiles):
    asked = []
    monkeypatch.setattr(pipeline, "frames_per_forward", lambda device, free, n: asked.append((device.type, free, n)))
    small_trident.frames_per_forward(Params().update(**update), (1000, 2000), 123)
    assert asked == [("cpu", 123, tiles)]  # (auto: a 2000x1000 frame is two tiles about SAM's side)


def test_frames_of_two_sizes_in_one_forward_are_refused_in_one_line(small_trident, photo):
    frames = [photo[:64, :96], photo[:80, :64]]
    with pytest.raises(ValueError, match="one size, not 96x64 and 64x80"):
        compute_frame_window_features(small_trident.clip, small_trident.dino, frames, Params().windows)
    with pytest.raises(ValueError, match="one size"):
        encode_frames(small_trident.sam, frames, Params().aggregation)


@pytest.mark.parametrize("refine", [False, True])
def test_each_frames_share_is_freed_before_its_result_is_handed_on(small_trident, photo, monkeypatch, refine):
    """The group's feature maps (and, for the refinement, what it reads of SAM's encodings: the last block's input)
    are held until each frame is segmented, not beyond (not at all without refinement; the q, k, v the aggregation
    read, never once the feature maps are made), and no frame's result is held while the next one is segmented."""
    made_maps, made_inputs, made_qkv = [], [], []
    encode, feature_map = pipeline.encode_frames, pipeline.compute_feature_map

    def tracked_encodings(*args):
        encodings = encode(*args)
        made_inputs.extend(weakref.ref(e.whole.last_input) for e in encodings)
        made_qkv.extend([weakref.ref(e.whole.q), weakref.ref(e.whole.k), weakref.ref(e.whole.v)] for e in encodings)
        return encodings

    def tracked_map(*args, **kwargs):
        fm = feature_map(*args, **kwargs)
        made_maps.append(weakref.ref(fm))
        return fm

    monkeypatch.setattr(pipeline, "encode_frames", tracked_encodings)
    monkeypatch.setattr(pipeline, "compute_feature_map", tracked_map)
    finish, results, alive_at_start = pipeline.Trident._finish, [], []

    def finishing(*args):  # no earlier frame's result alive when the next frame is segmented
        gc.collect()
        alive_at_start.append(sum(r() is not None for r in results))
        seg = finish(*args)
        results.append(weakref.ref(seg))
        return seg

    monkeypatch.setattr(pipeline.Trident, "_finish", finishing)
    alive = []
    params = Params().update(refine=refine)
    for seg in small_trident.segment_frames(_frames(photo)[:3], CLASSES, params, per_forward=3):
        gc.collect()
        alive.append(([r() is not None for r in made_maps], [r() is not None for r in made_inputs],
                      [any(r() is not None for r in qkv) for qkv in made_qkv]))
        del seg  # (as Trident Segment lets go of each frame's full result)
    held = [[False, True, True], [False, False, True], [False, False, False]]
    assert alive == [(h, h if refine else [False] * 3, [False] * 3) for h in held]
    assert alive_at_start == [0, 0, 0]


def test_sam_attention_bands_shrink_with_several_frames_heads_on_a_gpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert query_band(cuda, 12, 4096, 2) == query_band(cuda, 12, 4096, 4) == 1024  # one frame: as before
    rows = query_band(cuda, 8 * 12, 4096, 2)
    assert rows * 8 * 12 * 4096 * 2 <= 256 << 20 and rows >= 64
    assert query_band(cpu, 96, 4096, 2) == (16 << 20) // (2 * 96 * 4096)


def test_trident_segment_node_shares_forwards_where_told(loaded, photo, monkeypatch):
    """The node with several frames per forward (as on a GPU): the same labels as with one, in order, the text
    and the temporal smoothing fed frame by frame."""
    clip, dino, sam = loaded
    image = as_image(*_frames(photo)[:3])
    stages = core("pipeline").Trident
    inputs = dict(image=image, clip=clip, dino=dino, sam=sam, classes=CLASSES, preset="default", refine=False,
                  sam_tiles="preset", temporal_smoothing=0.5)
    (one,) = run("TridentSegment", **inputs)
    groups = []
    original = stages._segment_group
    monkeypatch.setattr(stages, "_segment_group", lambda self, imgs, *a: groups.append(len(imgs)) or original(
        self, imgs, *a))
    monkeypatch.setattr(stages, "frames_per_forward", lambda self, params, size, free=None: 2)
    (shared,) = run("TridentSegment", **inputs)
    assert groups == [2, 1] and len(shared) == len(one) == 3
    for a, b in zip(shared, one):
        assert (a.labels == b.labels).float().mean() >= 0.999
        # smoothed probabilities are kept in float16 (compact.py): float32's rounding of another batch (1e-6, seen
        # under load) can cross a float16 rounding boundary, one float16 step (2^-11 at 0.6) apart
        assert torch.allclose(a.probs, b.probs, atol=2e-5, rtol=2 ** -10)


@pytest.mark.parametrize("per_forward", [1, lambda size: 1], ids=["int", "choice per size"])
def test_one_frame_per_forward_holds_no_image_while_the_next_is_read(small_trident, photo, per_forward):
    """The command line's images (a choice per size, 1 on the CPU) and the nodes' frames: the previous image is
    gone when the next one is read (a 20000x20000 image would otherwise be held twice)."""
    refs = []

    def images():
        for k in range(3):
            assert all(r() is None for r in refs), f"image {len(refs) - 1} still held while image {k} is read"
            img = np.ascontiguousarray(photo[:64, 10 * k:10 * k + 96])
            refs.append(weakref.ref(img))
            yield img
            del img

    for seg in small_trident.segment_frames(images(), CLASSES, Params(), per_forward=per_forward):
        del seg
    assert len(refs) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_window_forwards_of_two_equal_one_forward_of_every_window(small_ckpts, photo, dtype):
    """On the CPU DINO and CLIP take two windows per forward (their activations stay in the cache): each window's
    tokens equal those of one forward over all of an image's windows, bit for bit, in float32 and in bf16."""
    from trident_core.image import clip_input
    from trident_core.models import load_clip, load_dino
    from trident_core.window_features import frame_window_features
    from trident_core.windows import plan_windows

    clip, dino = load_clip(small_ckpts["clip"], "cpu", dtype), load_dino(small_ckpts["dino"], "cpu", dtype)
    config = Params().windows
    image = np.ascontiguousarray(photo[:150, :200])
    x = clip_input(image, config.short_side, clip.patch_size, config.window, config.long_cap)
    plan = plan_windows(tuple(x.shape[-2:]), config.window, config.stride)
    assert window_chunk(clip.device) == 2 and len(plan) > 2 and window_chunk(torch.device("cuda")) == 8
    calls = []
    hook = clip.model.visual.conv1.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    got = compute_window_features(clip, dino, image, config)
    hook.remove()
    whole = frame_window_features(clip, dino, [x], plan, config, image_size=image.shape[:2], chunk=len(plan))[0]
    assert calls == [2] * (len(plan) // 2) + [1] * (len(plan) % 2)
    assert torch.equal(got.tokens, whole.tokens)


@pytest.mark.parametrize("tiles", ["1x1", "1x2"])
def test_each_frame_is_hashed_once_in_shared_forwards(small_trident, photo, monkeypatch, tiles):
    """A group's frames are hashed once each (window features, encodings and tiles share the digest; it took 1.5 ms
    a frame on a GPU host), and every stage's result carries the frame's own digest."""
    from trident_core import image, sam_tiles
    from trident_core.models import sam as sam_module

    frames = _frames(photo)[:2]
    hashed = []
    for module in (pipeline, sam_tiles, sam_module):
        monkeypatch.setattr(module, "image_digest", lambda img: hashed.append(1) or image.image_digest(img))
    wfs, encs = [], []
    feature_map = pipeline.compute_feature_map
    monkeypatch.setattr(pipeline, "compute_feature_map", lambda wf, clip, sam, enc, *a, **k: wfs.append(
        wf) or encs.append(enc) or feature_map(wf, clip, sam, enc, *a, **k))
    list(small_trident.segment_frames(frames, CLASSES, Params().update(sam_tiles=tiles, refine=False),
                                      per_forward=2))
    # 1x2: each tile is not its frame, so SAM hashes each of its 2 tiles (the frames here are on the 16-pixel grid)
    assert len(hashed) == len(frames) * (1 if tiles == "1x1" else 3)
    for frame, wf, enc in zip(frames, wfs, encs):
        want = image.image_digest(frame)
        assert wf.image_digest == enc.image_digest == want
        if tiles == "1x1":
            assert enc.encodings[0].image_digest == want


def test_a_nan_feature_map_in_shared_forwards_is_refused_before_any_result(small_trident, photo, monkeypatch):
    """The group's CLIP projections go unchecked (each would wait for a GPU's queue); the classification's check
    of its logits refuses them before a frame's result is handed on."""
    from trident_core.models import ClipModel

    project = ClipModel.project
    checked = []

    def poisoned(self, tokens, check=True):
        checked.append(check)
        return project(self, tokens, check) * float("nan")

    monkeypatch.setattr(ClipModel, "project", poisoned)
    frames = _frames(photo)[:2]
    got = []
    with pytest.raises(ValueError, match="NaN/Inf"):
        for seg in small_trident.segment_frames(frames, CLASSES, Params().update(refine=False), per_forward=2):
            got.append(seg)
    assert got == [] and checked == [False, False]
