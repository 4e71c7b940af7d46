"""Each stage against an independent plain formulation."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trident_core import sam_affinity
from trident_core.aggregation import aggregate
from trident_core.classes import UNLABELED, ClassList, parse_classes
from trident_core.classify import class_probs, labels_from_probs
from trident_core.config import AggregateConfig
from trident_core.image import clip_input, fit_to_patches, rescale_short_side, round_up_to
from trident_core.sam_affinity import affinity_rows
from trident_core.sam_tiles import SamTiling, encode_tiles, parse_tiles
from trident_core.window_features import WindowFeatures, proxy_attention, similarity_mean, splice
from trident_core.windows import plan_windows


def test_s0_rescale_and_patch_rounding():
    img = np.zeros((375, 843, 3), np.uint8)
    x = clip_input(img, 448, 16, 336)
    assert tuple(x.shape[-2:]) == (448, 1008)  # truncation, not rounding: 448x1007 -> 448x1008, not 464x1008
    y = fit_to_patches(torch.zeros(1, 3, 448, 667), 16, 336)
    assert tuple(y.shape[-2:]) == (464, 672)
    assert rescale_short_side(np.zeros((100, 50, 3), np.uint8), 448).shape[:2] == (896, 448)
    assert rescale_short_side(np.zeros((10, 4000, 3), np.uint8), 448).shape[:2] == (5, 2048)  # long cap
    # already on the grid and large enough: unchanged; small ones are upscaled to the window (deviation)
    assert fit_to_patches(torch.zeros(1, 3, 448, 448), 16, 336).shape[-2:] == (448, 448)
    assert fit_to_patches(torch.zeros(1, 3, 320, 480), 16, 336).shape[-2:] == (336, 480)
    assert round_up_to(np.zeros((17, 23, 3), np.uint8), 16).shape[:2] == (32, 32)


def test_window_plan_matches_brute_force():
    for h, w, stride in [(448, 1008, 224), (336, 336, 224), (464, 672, 112), (2048, 336, 224)]:
        plan = plan_windows((h, w), 336, stride)
        for y1, x1, y2, x2 in plan.boxes:
            assert y2 - y1 == 336 and x2 - x1 == 336 and 0 <= y1 and y2 <= h and x2 <= w
        cover = np.zeros((h, w), int)
        for y1, x1, y2, x2 in plan.boxes:
            cover[y1:y2, x1:x2] += 1
        assert cover.min() >= 1
        starts = sorted({b[0] for b in plan.boxes})
        assert starts[:-1] == list(range(0, stride * (len(starts) - 1), stride))
        assert len(plan) == plan.grid[0] * plan.grid[1]


def test_proxy_attention_against_dense():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 16, 8, generator=g)
    f = F.normalize(feats, dim=-1)
    s = torch.einsum("bmc,bnc->bmn", f, f)
    assert torch.allclose(similarity_mean(feats), s.mean(), atol=1e-6)
    z = (s - s.mean() * 1.2) * 3.0
    z[z < 0] = float("-inf")
    assert torch.allclose(proxy_attention(feats, s.mean(), 3.0, 1.2), z.softmax(-1), atol=1e-6)


def test_proxy_attention_all_negative_row_is_not_nan():
    feats = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    p = proxy_attention(feats, torch.tensor(5.0), 3.0, 1.2)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(1, 2))


def test_splice_against_dense_average():
    plan = plan_windows((336, 560), 336, 224)
    tokens = torch.randn(len(plan), 21 * 21, 4)
    wf = WindowFeatures(tokens, (21, 21), plan, 16, (336, 560), (336, 560))
    got = splice(wf)
    total, count = torch.zeros(4, 21, 35), torch.zeros(21, 35)
    for t, (y1, x1, _, _) in zip(tokens, plan.boxes):
        for i in range(21):
            for j in range(21):
                total[:, y1 // 16 + i, x1 // 16 + j] += t[i * 21 + j]
                count[y1 // 16 + i, x1 // 16 + j] += 1
    assert torch.allclose(got, total / count, atol=1e-6)


def _dense_affinity(enc, sam, cos_fac, refine_neg_cos):
    """The reference's formula on full matrices, with segment_anything's own relative-position code."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    attn_mod = sam.model.image_encoder.blocks[-1].attn
    ph, pw = enc.padded_grid
    attn = (enc.q * attn_mod.scale) @ enc.k.transpose(-2, -1)
    attn = add_decomposed_rel_pos(attn, enc.q, attn_mod.rel_pos_h, attn_mod.rel_pos_w, (ph, pw), (ph, pw))
    heads = attn.shape[0]
    hs, ws = enc.grid
    attn = attn.softmax(-1).view(heads, ph, pw, ph, pw)[:, :hs, :ws, :hs, :ws].reshape(heads, hs * ws, hs * ws)
    v = F.normalize(enc.v.view(heads, ph, pw, -1)[:, :hs, :ws].reshape(heads, hs * ws, -1), dim=-1)
    cos = v @ v.transpose(1, 2)
    tau = cos_fac * cos.mean(dim=0, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        tau = torch.where(tau < 0, 0.6, tau)
    tau = torch.where(tau > 0.9, 0.9, tau)
    a = torch.where(cos > tau, attn, torch.zeros_like(attn)).mean(0)
    mean_cos = cos.mean(0)
    eq4 = mean_cos.masked_fill(mean_cos <= tau[0], float("-inf")).softmax(-1).nan_to_num(0.0)
    return a / a.sum(-1, keepdim=True), attn, eq4


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("cos_fac,refine_neg_cos", [(1.2, True), (3.0, False), (0.0, True)])
def test_blocked_affinity_equals_dense(small_trident, photo, cos_fac, refine_neg_cos, batched, monkeypatch):
    """One head at a time (the CPU's way) and all heads at once (GPUs') give the reference's affinity."""
    monkeypatch.setattr(sam_affinity, "heads_at_once", lambda _device: batched)
    sam = small_trident.sam
    enc = sam.encode(round_up_to(photo[:300, :400], 16))
    assert enc.grid == (48, 64)
    dense, attn, eq4 = _dense_affinity(enc, sam, cos_fac, refine_neg_cos)
    config = AggregateConfig(cos_fac=cos_fac, refine_neg_cos=refine_neg_cos)
    rows = affinity_rows(enc, sam, 100, 400, config)
    assert torch.allclose(rows, dense[100:400], atol=1e-6)
    g = torch.randn(dense.shape[0], 7)
    assert torch.allclose(aggregate(enc, sam, g, config, row_block=333), dense @ g, atol=1e-5)
    att_rows = affinity_rows(enc, sam, 0, 50, AggregateConfig(correlation="attention"))
    att = attn.mean(0)[:50]
    assert torch.allclose(att_rows, att / att.sum(-1, keepdim=True), atol=1e-6)
    cos_rows = affinity_rows(enc, sam, 7, 90, replace(config, correlation="cosine"))
    assert torch.allclose(cos_rows, eq4[7:90], atol=1e-6) and (eq4[7:90] == 0).any()
    assert torch.equal(aggregate(enc, sam, g, AggregateConfig(correlation="none")), g)


def test_a_row_with_no_affinity_keeps_its_own_token():
    """Rows start..stop whose affinity sums to 0 become the identity's rows start..stop (each token its own
    feature); the others are divided by their sums."""
    a = torch.rand(5, 12)
    a[[1, 3]] = 0.0
    got = sam_affinity._normalised(a, 4, 9)
    for i in range(5):
        want = torch.zeros(12)
        if i in (1, 3):
            want[4 + i] = 1.0
        else:
            want = a[i] / a[i].sum()
        assert torch.allclose(got[i], want)


def test_sam_encoding_equals_segment_anythings_own_forward(small_trident, photo):
    """q, k, v equal, bit for bit, what a hook sees in segment_anything's full forward on its own modules and
    PyTorch's kernels; the embedding finished from the encoding equals its output, and the encoding is left as
    it was (a new tensor, nothing cached on it)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    sam = small_trident.sam
    img = round_up_to(photo[:300, :400], 16)
    enc = sam.encode(img)
    model = copy.deepcopy(sam.model)
    for mod in model.modules():
        mod.__dict__.pop("forward", None)  # no banded attention, no oneDNN
    x = torch.as_tensor(ResizeLongestSide(1024).apply_image(img)).permute(2, 0, 1)[None].float()
    seen = {}
    qkv_mod = model.image_encoder.blocks[-1].attn.qkv
    handle = qkv_mod.register_forward_hook(lambda _m, _i, out: seen.__setitem__("qkv", out))
    try:
        full = model.image_encoder(model.preprocess(x))
    finally:
        handle.remove()
    b, h, w, _ = seen["qkv"].shape
    q, k, v = seen["qkv"].reshape(b, h * w, 3, 1, -1).permute(2, 0, 3, 1, 4).reshape(3, b, h * w, -1)
    assert torch.equal(enc.q, q) and torch.equal(enc.k, k) and torch.equal(enc.v, v)
    before = dict(vars(enc))
    assert torch.equal(sam.image_embedding(enc), full)
    assert vars(enc).keys() == before.keys() and all(vars(enc)[k] is v for k, v in before.items())


def test_tiles_split_the_rounded_image(small_trident, photo):
    wide = np.concatenate([photo, photo[:, ::-1]], axis=1)
    encs = encode_tiles(small_trident.sam, wide, SamTiling.of((1, 2), wide.shape[:2])).encodings
    assert [e.original_size for e in encs] == [(512, 512), (512, 512)]
    whole = small_trident.sam.encode(photo)
    assert torch.equal(encs[0].q, whole.q) and torch.equal(encs[0].v, whole.v)
    assert parse_tiles("auto", (512, 1024)) == (1, 2) and parse_tiles("auto", (3000, 1000)) == (3, 1)
    assert parse_tiles("auto", (1400, 1000)) == (1, 1) and parse_tiles("auto", (3000, 4000)) == (4, 4)
    assert parse_tiles("auto", (2048, 8192)) == (2, 8)
    assert parse_tiles("2x3", (10, 10)) == (2, 3)
    with pytest.raises(ValueError, match="ROWSxCOLS"):
        parse_tiles("two", (10, 10))


def test_trimmed_text_encoding_equals_full_length(small_trident):
    import open_clip

    tokens = open_clip.tokenize(["a photo of a horse.", "a bad photo of the big red fire truck."])
    full = small_trident.clip.model.encode_text(tokens)
    assert torch.allclose(small_trident.clip.encode_prompts(tokens), full, atol=1e-5)


def test_text_cache_reuses_embeddings(small_trident):
    cl = parse_classes("zebra, okapi")
    first = small_trident.text(cl)
    small_trident.clip.text_cache["zebra"] = torch.zeros_like(first[0])
    assert torch.equal(small_trident.text(cl)[0], torch.zeros_like(first[0]))
    del small_trident.clip.text_cache["zebra"]


def test_synonym_max_merge_and_thresholds():
    cl = ClassList((("sky", "wall"), ("horse",), ("grass", "lawn")), has_background=True)
    logits = torch.randn(5, 3, 4)
    p = (logits * 40).softmax(0)
    got = class_probs(logits, cl, 40)
    want = torch.stack([p[:2].max(0).values, p[2], p[3:].max(0).values])
    assert torch.allclose(got, want)
    labels = labels_from_probs(got, cl, 0.99)
    assert set(labels[got.max(0).values < 0.99].tolist()) <= {0}
    no_bg = ClassList(cl.classes, has_background=False)
    labels = labels_from_probs(got, no_bg, 0.99)
    assert (labels[got.max(0).values < 0.99] == UNLABELED).all()


@pytest.mark.parametrize("synonyms", [True, False])
@pytest.mark.parametrize("size", [(1000, 733), (37, 1), (5, 4), (257, 513)])
def test_class_probs_in_place_equal_the_reference_formulation(synonyms, size):
    """class_probs with overwrite=True (classify's own temporary logits, scaled and turned into probabilities in
    their memory; the maxima written into the result) gives the reference's values bit for bit; without it the
    logits are left as they were."""
    torch.manual_seed(0)
    groups = (("sky", "wall"), ("horse",), ("grass", "lawn", "turf")) if synonyms else (("sky",), ("horse",))
    cl = ClassList(groups, has_background=True)
    logits = torch.randn(sum(len(g) for g in groups), *size) * 0.3
    p = (logits * 40).softmax(0)  # the reference's formulation
    starts = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
    want = torch.stack([p[s:s + len(g)].max(0).values for s, g in zip(starts, groups)])
    kept = logits.clone()
    assert torch.equal(class_probs(logits, cl, 40), want) and torch.equal(logits, kept)
    got = class_probs(logits, cl, 40, overwrite=True)
    assert torch.equal(got, want)
    if not synonyms:  # one query per class: the probabilities are the logits' own memory, no image-sized copy
        assert got.data_ptr() == logits.data_ptr()


def test_banded_sam_attention_equals_segment_anything(small_trident):
    """The banded forward (oneDNN products on the CPU) is bit-identical to segment_anything's own modules."""
    from segment_anything.modeling.image_encoder import Attention

    enc = small_trident.sam.model.image_encoder
    g = torch.Generator().manual_seed(3)
    for blk, shape in ((enc.blocks[-1], (1, 64, 64, 64)), (enc.blocks[0], (25, 14, 14, 64))):
        x = torch.randn(shape, generator=g)
        assert blk.attn.forward.__func__ is not Attention.forward  # the loader installed the banded forward
        plain = copy.deepcopy(blk.attn)
        for mod in plain.modules():
            mod.__dict__.pop("forward", None)  # the library's own modules and PyTorch's kernels
        assert torch.equal(blk.attn(x), Attention.forward(plain, x))


def test_text_progress_counts_names_and_skips_cached_ones(small_trident, monkeypatch):
    """Large class lists report progress after every batch of prompts; cached names cost nothing and report none."""
    import trident_core.text as text_mod

    monkeypatch.setattr(text_mod, "PROMPT_BATCH", 160)  # two names per batch
    names = [f"thing {i}" for i in range(5)]
    for n in names:
        small_trident.clip.text_cache.pop(n, None)
    calls: list[tuple[int, int]] = []
    first = text_mod.encode_names(small_trident.clip, names, lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    stages: list[str] = []
    again = small_trident.text(parse_classes(", ".join(names)), stages.append)
    assert stages == [] and torch.equal(again, first)
    small_trident.clip.text_cache.pop("thing 4")
    small_trident.text(parse_classes(", ".join(names)), stages.append)
    assert stages == ["text 100%"]


@pytest.mark.parametrize("with_failed", [True, False])
def test_refinements_final_scores_in_place_equal_the_reference_formulation(with_failed):
    """refine's last steps, class by class in the refined map's memory, against the reference's whole-map
    expressions: bit for bit, with classes never refined, pixels no class covers, and failed regions."""
    from trident_core.refine import final_scores

    torch.manual_seed(0)
    c, h, w = 7, 61, 43
    probs = torch.rand(c, h, w).softmax(0)
    refined = torch.rand(c, h, w) * (torch.rand(c, h, w) > 0.6)
    refined[2] = 0  # a class with no kept mask
    refined[:, :10, :10] = 0  # pixels no mask covers
    failed = (torch.rand(h, w) > 0.7).float() if with_failed else None
    want = refined.clone()
    if failed is not None:
        want = torch.maximum(want, failed[None] * probs)
    want = torch.where(want.sum(dim=0, keepdim=True) != 0, want, probs)
    got = final_scores(refined, probs, failed)
    assert torch.equal(got, want) and got.data_ptr() == refined.data_ptr()
