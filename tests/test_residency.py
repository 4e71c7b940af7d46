"""Unmapping the resident pages of memory-mapped weights: memory goes down, values never change, and memory that
is not a clean file mapping (anonymous, written) is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resident import mapped_resident_kb

from trident_core.residency import release

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")


def _rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssFile:"))


def test_mapped_weights_leave_memory_and_keep_their_values(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"big": torch.randn(16_000_000), "small": torch.randn(10)}, path)  # 61 MB
    sd = torch.load(path, mmap=True, weights_only=True)
    want = {k: v.clone() for k, v in sd.items()}
    sd["big"].sum()  # resident
    before = _rss_file_mb()
    freed = release(sd.values())
    assert freed >= 60 * 2**20
    assert before - _rss_file_mb() > 50
    assert all(torch.equal(sd[k], want[k]) for k in sd)  # mapped again from the file, same values


def test_anonymous_and_written_memory_is_left_alone(tmp_path):
    anon = torch.randn(4_000_000)
    copy = anon.clone()
    assert release([anon]) == 0 and torch.equal(anon, copy)
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(4_000_000)}, path)
    sd = torch.load(path, mmap=True, weights_only=True)
    sd["w"][123] = 42.0  # a copy-on-write page: its mapping is not released
    copy = sd["w"].clone()
    assert release(sd.values()) == 0
    assert torch.equal(sd["w"], copy) and sd["w"][123] == 42.0


def test_segmentation_is_bit_identical_after_releasing_every_model(small_ckpts, photo):
    from trident_core import Trident, get_preset

    tr = Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], device="cpu")
    params = get_preset("voc21").params.update(refine=True)
    img = photo[:160, :200]
    first = tr.segment(img, "sky, person, flag", params)
    assert release(tr.dino.model) + release(tr.sam.model) > 0  # the .pth files are memory-mapped
    release(tr.clip.model)
    again = tr.segment(img, "sky, person, flag", params)
    assert torch.equal(first.labels, again.labels) and torch.equal(first.grid_logits, again.grid_logits)
    assert torch.equal(first.probs, again.probs)
    tr.release_weights = True  # released within the call, after each stage
    third = tr.segment(img, "sky, person, flag", params)
    assert torch.equal(first.labels, third.labels) and torch.equal(first.grid_logits, third.grid_logits)
    assert torch.equal(first.labels_coarse, third.labels_coarse)


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))


def test_trim_heap_returns_freed_holes_of_the_heap():
    """Freed blocks between live ones stay resident until the heap is trimmed."""
    from trident_core.residency import trim_heap

    blocks = [bytearray(64 << 10) for _ in range(3000)]  # 192 MB of 64 KB blocks, below malloc's mmap threshold
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])  # touch every page
    del blocks[::2]  # holes: 96 MB freed, each hole between two live blocks
    before = _rss_anon_mb()
    if not trim_heap():
        pytest.skip("not glibc")
    assert before - _rss_anon_mb() > 50
    assert all(b[0] == 1 for b in blocks)  # the live blocks are untouched


@pytest.mark.parametrize(("refine", "tiles"), [(False, "1x1"), (True, "1x1"), (False, "1x2")])
def test_each_model_is_released_as_soon_as_its_stage_is_done(small_ckpts, photo, monkeypatch, refine, tiles):
    """With release_weights, the file mappings read once for the image: CLIP's text tower once the class names are
    encoded, DINO's weights and the freed heap before CLIP runs, CLIP's weights and the freed heap before SAM
    encodes, the freed heap between SAM's tiles, SAM's encoder and the freed heap before the aggregation, the freed
    heap before the classification and before the refinement, the rest of SAM and the freed heap after the image."""
    from trident_core import Trident, get_preset, pipeline, sam_tiles

    tr = Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], device="cpu")
    tr.release_weights = True
    events = []
    names = {id(tr.dino.model): "dino", id(tr.clip.model.visual): "clip", id(tr.sam.model.image_encoder): "sam encoder",
             id(tr.sam.model): "sam"}
    text_tower = [id(p) for n, p in tr.clip.model.named_parameters() if not n.startswith("visual.")]

    def released(m):
        if isinstance(m, torch.nn.Module):
            if id(m) in names:  # (a tower's blocks, released as they run, are another test's)
                events.append("release " + names[id(m)])
        else:  # (the text tower: every CLIP parameter but the visual tower's)
            assert [id(p) for p in m] == text_tower
            events.append("release clip text")
        return 0

    monkeypatch.setattr(pipeline, "releaser", lambda: events.append("read the mappings") or released)
    monkeypatch.setattr(pipeline, "trim_heap", lambda: events.append("trim"))
    monkeypatch.setattr(sam_tiles, "trim_heap", lambda: events.append("trim"))
    for obj, method in ((tr.clip, "window_values"), (tr.sam, "encode_many"), (pipeline, "splice_and_aggregate"),
                        (pipeline, "classify"), (pipeline, "refine")):
        real = getattr(obj, method)
        monkeypatch.setattr(obj, method, lambda *a, _real=real, _m=method, **k: events.append(_m) or _real(*a, **k))
    tr.segment(photo[:160, :200], "sky, person", get_preset("voc21").params.update(refine=refine, sam_tiles=tiles))
    runs = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]  # (window_values once per chunk)
    sam = ["encode_many", "trim", "encode_many"] if tiles == "1x2" else ["encode_many"]
    assert runs == ["read the mappings", "release clip text", "release dino", "trim", "window_values",
                    "release clip", "trim", *sam, "release sam encoder", "trim", "splice_and_aggregate", "trim",
                    "classify", *(["trim", "refine"] if refine else []), "release sam", "trim"]


@pytest.mark.parametrize("given", [None, "0"])
def test_the_command_tells_mkl_to_free_its_work_buffers_before_torch_loads_it(given):
    """MKL keeps float32 products' work buffers for reuse (20 to 60 MB at SAM's encoder) unless
    MKL_DISABLE_FAST_MM is set when torch loads it: the command's entry sets it first; a user's own value stays."""
    code = ("import os, sys, types\n"
            "fake = types.ModuleType('trident_core.cli')\n"
            "fake.run = lambda: print(os.environ.get('MKL_DISABLE_FAST_MM'), 'torch' in sys.modules)\n"
            "sys.modules['trident_core.cli'] = fake\n"
            "from trident_core.__main__ import main\n"
            "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    if given is not None:
        env["MKL_DISABLE_FAST_MM"] = given
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.split() == [given or "1", "False"], r.stderr


def _whole_pages_kb(tensors) -> int:
    """What `release` can give back of the tensors: the whole pages inside each one's storage."""
    page = os.sysconf("SC_PAGE_SIZE")
    spans = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
    return sum(max(0, (lo + n) // page - -(-lo // page)) for lo, n in spans) * page // 1024


def test_sam_tiles_give_back_each_encoder_block_once_it_has_run(small_ckpts, photo, monkeypatch):
    """after_block (a releaser): each block of SAM's encoder (but the last, which the affinity and the refinement
    use) leaves memory as soon as it has run, in every tile, and the encodings stay the same bit for bit."""
    from trident_core import residency
    from trident_core.models import load_sam
    from trident_core.sam_tiles import SamTiling, encode_frame_tiles

    sam = load_sam(small_ckpts["sam"], "cpu")
    img = photo[:160, :200]
    tiling = SamTiling.of("1x2", img.shape[:2])
    want = encode_frame_tiles(sam, [img], tiling)[0]
    blocks = list(sam.model.image_encoder.blocks)
    droppable = _whole_pages_kb([p for b in blocks[:-1] for p in b.parameters()])
    assert droppable > 0
    before = mapped_resident_kb(small_ckpts["sam"])  # (every block resident: the first call read them all)
    released, real = [], residency.release
    monkeypatch.setattr(residency, "release", lambda m, spans=None: released.append(m) or real(m, spans))
    got = encode_frame_tiles(sam, [img], tiling, after_block=residency.releaser())[0]
    assert released == blocks[:-1] * 2  # each as it has run, in each of the two tiles
    assert before - mapped_resident_kb(small_ckpts["sam"]) >= 0.9 * droppable  # (the kernel may map neighbours back)
    for a, b in zip(want.encodings, got.encodings, strict=True):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("q", "k", "v", "last_input"))


def test_window_features_give_back_each_tower_block_once_it_has_run(small_ckpts, photo, monkeypatch):
    """release_weights: in every forward of DINO and CLIP, each block (CLIP's but the last, whose value projection
    the method reads) is handed over as soon as it has run, DINO's before CLIP's, and the features stay the same
    bit for bit with the blocks' pages given back."""
    from trident_core import Trident, get_preset, pipeline
    from trident_core.residency import releaser

    tr = Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], device="cpu")
    windows = get_preset("voc21").params.windows
    img = photo[:160, :200]
    want = pipeline.compute_window_features(tr.clip, tr.dino, img, windows)
    dino_blocks, clip_blocks = list(tr.dino.model.blocks), list(tr.clip.model.visual.transformer.resblocks)[:-1]
    forwards = {"dino": 0, "clip": 0}
    for model, method, name in ((tr.dino, "patch_tokens", "dino"), (tr.clip, "window_values", "clip")):
        real = getattr(model, method)
        monkeypatch.setattr(model, method, lambda *a, _r=real, _n=name, **k: forwards.update({_n: forwards[_n] + 1})
                            or _r(*a, **k))
    given, release = [], releaser()
    got = pipeline.compute_window_features(tr.clip, tr.dino, img, windows,
                                           after_block=lambda b: given.append(b) or release(b))
    assert forwards["dino"] == forwards["clip"] > 1  # (several forwards: every one hands its blocks over)
    assert given == dino_blocks * forwards["dino"] + clip_blocks * forwards["clip"]
    assert torch.equal(got.tokens, want.tokens)
    tr.release_weights = True  # the pipeline's own wiring: one releaser for the image, for every stage
    seen = []
    monkeypatch.setattr(pipeline, "releaser", lambda: seen.append)
    tr.segment(img, "sky, person", get_preset("voc21").params)
    sam_blocks, text_blocks = list(tr.sam.model.image_encoder.blocks)[:-1], list(tr.clip.model.transformer.resblocks)
    k = next(i for i, m in enumerate(seen) if not any(m is b for b in text_blocks))
    assert k and seen[:k] == text_blocks * (k // len(text_blocks))  # the names encoded: each text block per batch
    assert not isinstance(seen[k], torch.nn.Module)  # (then the text tower's parameters)
    n = forwards["dino"] // 2  # (this image's forwards: the same windows as above)
    assert seen[k + 1:] == [*dino_blocks * n, tr.dino.model, *clip_blocks * n, tr.clip.model.visual, *sam_blocks,
                        tr.sam.model.image_encoder, tr.sam.model]


@pytest.mark.parametrize("refine", [False, True])
def test_sams_encodings_are_freed_before_classification_but_what_the_refinement_reads(small_ckpts, photo,
                                                                                      monkeypatch, refine):
    """SAM's encoding (the last block's q, k, v and input: 50 MB at 1024x1024): its q, k, v, read by the aggregation
    only, are freed before the classification's full-resolution maps (its peak); its input, which the refinement
    reads, is kept when refining. The result is the stages' own with the whole encoding, bit for bit."""
    import weakref

    from trident_core import Trident, get_preset, pipeline
    from trident_core.classify import classify
    from trident_core.refine import refine as refine_stage

    tr = Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], device="cpu")
    made, alive = [], []
    real_encode, real_classify = pipeline.encode_image, pipeline.classify

    def encode(*a, **k):
        out = real_encode(*a, **k)
        enc = out.encodings[0]  # (the one tile: the encoding the refinement reads)
        made.append([weakref.ref(t) for t in (enc.q, enc.k, enc.v, enc.last_input)])
        return out

    def classify_spy(*a, **k):
        alive.append([r() is not None for r in made[-1]])
        return real_classify(*a, **k)

    monkeypatch.setattr(pipeline, "encode_image", encode)
    monkeypatch.setattr(pipeline, "classify", classify_spy)
    params = get_preset("voc21").params.update(refine=refine)
    image = photo[:160, :200]
    seg = tr.segment(image, "sky, person", params)
    assert alive == [[False, False, False, refine]]
    monkeypatch.undo()
    from trident_core.classes import parse_classes

    cl = parse_classes("sky, person")
    wf = pipeline.compute_window_features(tr.clip, tr.dino, image, params.windows)
    encodings = pipeline.encode_image(tr.sam, image, params.aggregation)
    want = classify(pipeline.compute_feature_map(wf, tr.clip, tr.sam, encodings, params.aggregation), tr.text(cl),
                    cl, params.classification)
    if refine:
        want = refine_stage(want, tr.sam, image, params.refinement, encodings.whole)
    assert torch.equal(seg.labels, want.labels) and torch.equal(seg.probs, want.probs)


def test_an_encoding_for_the_refinement_refines_as_the_whole_one(small_ckpts, photo):
    """`SamEncoding.for_refinement` keeps what the refinement reads (the last block's input, sizes, identity):
    the refined labels and probabilities are those of the whole encoding, bit for bit."""
    from trident_core import Trident, get_preset, pipeline
    from trident_core.refine import refine

    tr = Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], device="cpu")
    params = get_preset("voc21").params.update(refine=False)
    image = photo[:96, :128]
    coarse = tr.segment(image, "sky, person, grass", params)
    enc = pipeline.encode_image(tr.sam, image, params.aggregation).whole
    light = enc.for_refinement()
    assert light.q.numel() == light.k.numel() == light.v.numel() == 0 and enc.q.numel() > 0
    assert light.last_input is enc.last_input and light.made_by == enc.made_by and light.image_digest
    refinement = get_preset("voc21").params.refinement
    full, stripped = refine(coarse, tr.sam, image, refinement, enc), refine(coarse, tr.sam, image, refinement, light)
    assert torch.equal(full.labels, stripped.labels) and torch.equal(full.probs, stripped.probs)


def test_the_text_tower_gives_back_each_block_once_it_has_run(small_ckpts, monkeypatch):
    """Names being encoded: each block of CLIP's text tower is handed over as soon as it has run, in every batch of
    prompts, and the embeddings are the same bit for bit with the blocks' pages given back (a first run's peak was
    the text tower whole beside a batch's activations)."""
    from trident_core import text
    from trident_core.models import load_clip
    from trident_core.residency import releaser

    monkeypatch.setattr(text, "PROMPT_BATCH", 64)  # (several batches: 2 names x 80 prompts)
    want = text.encode_names(load_clip(small_ckpts["clip"], "cpu"), ["sky", "person"])  # (that model unmapped after)
    clip = load_clip(small_ckpts["clip"], "cpu")
    text.encode_names(clip, ["tree"])  # every text block read: resident
    blocks = list(clip.model.transformer.resblocks)
    droppable = _whole_pages_kb([p for b in blocks for p in b.parameters()])
    before = mapped_resident_kb(small_ckpts["clip"])
    batches = -(-2 * len(clip.templates()) // 64)
    given, release = [], releaser()
    got = text.encode_names(clip, ["sky", "person"], after_block=lambda b: given.append(b) or release(b))
    assert given == blocks * batches and batches > 1
    assert torch.equal(got, want)
    assert droppable > 0 and before - mapped_resident_kb(small_ckpts["clip"]) >= 0.9 * droppable
