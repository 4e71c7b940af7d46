"""trident_core.inspection: PCA pictures, heat maps, class lookup, point affinity against direct formulations."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trident_core.classes import ClassList, ClassListError, class_indices, parse_classes
from trident_core.classify import Segmentation
from trident_core.config import AggregateConfig
from trident_core.inspection import (
    class_probability,
    heat_rgb,
    mark_point,
    pca_rgb,
    point_affinity,
    point_to_pixels,
)
from trident_core.models import load_sam
from trident_core.sam_affinity import affinity_rows
from trident_core.sam_tiles import SamTiling, encode_tiles


def test_pca_separates_clusters_and_upsamples_by_blocks():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5  # four clusters span three dimensions: no noise component
    cluster = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]])  # [h=3, w=4]
    feats = centers[cluster].permute(2, 0, 1) + 0.01 * torch.randn(16, 3, 4, generator=g)
    rgb = pca_rgb(feats, (6, 8))
    assert rgb.shape == (6, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    small = rgb[::2, ::2]  # one pixel per token (nearest upsampling makes 2x2 blocks)
    assert torch.equal(rgb[1::2, 1::2], small)
    colours = {int(k): small[cluster == k] for k in range(4)}
    for k, c in colours.items():
        assert (c - c[0]).abs().max() < 0.05, f"cluster {k} is not one colour"
    means = torch.stack([c.mean(0) for c in colours.values()])
    assert torch.cdist(means, means)[~torch.eye(4, dtype=bool)].min() > 0.3
    assert torch.equal(pca_rgb(feats, (6, 8)), rgb)  # deterministic


def test_pca_first_component_follows_largest_variance():
    feats = torch.zeros(8, 2, 6)
    feats[0, :, 3:] = 10.0  # left/right halves differ along one axis (largest variance)
    feats[1] = torch.linspace(0, 1, 12).reshape(2, 6)  # a small gradient along another
    rgb = pca_rgb(feats)
    assert rgb.shape == (2, 6, 3)
    red = rgb[..., 0]
    assert (red[:, :3] - red[:, 3:]).abs().min() > 0.9  # red separates the halves


def test_heat_rgb_dark_to_bright():
    v = torch.linspace(0, 1, 11)[None].repeat(2, 1)
    rgb = heat_rgb(v)
    assert rgb.shape == (2, 11, 3)
    assert rgb[0, 0].max() < 0.05  # 0 is black
    assert rgb[0, -1, 0] > 0.9 and rgb[0, -1, 1] > 0.9 and rgb[0, -1, 2] < 0.8  # 1 is yellow
    luminance = rgb[0] @ torch.tensor([0.299, 0.587, 0.114])
    assert (luminance[1:] > luminance[:-1]).all()


def test_class_indices_synonyms_case_and_errors():
    cl = parse_classes("sky, Person; astronaut, flag")
    assert class_indices(cl, "ASTRONAUT") == [1]
    assert class_indices(cl, " flag ,  sky ; person") == [0, 1, 2]
    assert class_indices(cl, "") == [0, 1, 2]
    with pytest.raises(ClassListError, match="'dog'"):
        class_indices(cl, "sky, dog")


def _segmentation(refined: bool) -> Segmentation:
    cl = ClassList((("sky",), ("grass", "lawn")))
    probs = torch.rand(2, 4, 5)
    coarse = probs.flip(0) if refined else None
    labels = probs.argmax(0)
    return Segmentation(labels, probs, torch.zeros(3, 2, 2), cl, (4, 5), labels if refined else None, coarse)


def test_class_probability_refined_and_coarse():
    seg = _segmentation(refined=True)
    assert torch.equal(class_probability(seg, "Lawn"), seg.probs[1])
    assert torch.equal(class_probability(seg, "lawn", coarse=True), seg.probs_coarse[1])
    plain = _segmentation(refined=False)
    assert torch.equal(class_probability(plain, "sky", coarse=True), plain.probs[0])
    for bad in ("", "sky, grass"):
        with pytest.raises(ClassListError, match="exactly one class"):
            class_probability(seg, bad)


def test_point_to_pixels():
    assert point_to_pixels(0.5, 0.25, "fraction", (100, 200)) == (100, 25)
    assert point_to_pixels(1.0, 1.0, "fraction", (100, 200)) == (199, 99)
    assert point_to_pixels(150.7, 20.2, "pixels", (100, 200)) == (150, 20)
    assert point_to_pixels(199.9, 0, "pixels", (100, 200)) == (199, 0)
    with pytest.raises(ValueError):
        point_to_pixels(0, 0, "inches", (10, 10))


@pytest.mark.parametrize(("x", "y", "units", "said"), [
    (120, 40, "fraction", "set units to 'pixels'"),  # pixels typed with units left at fraction: was the corner
    (-0.1, 0.5, "fraction", "not a fraction"),
    (5000, 5000, "pixels", "outside the 200x100 image: give x from 0 to 199 and y from 0 to 99"),
    (200, 10, "pixels", "outside"), (10, -1, "pixels", "outside")])
def test_a_point_outside_the_image_is_refused_not_moved_to_its_edge(x, y, units, said):
    with pytest.raises(ValueError, match=re.escape(said)):
        point_to_pixels(x, y, units, (100, 200))


@pytest.fixture(scope="module")
def sam(small_ckpts):
    return load_sam(small_ckpts["sam"])


def test_point_affinity_is_the_affinity_row(sam):
    img = np.random.default_rng(0).integers(0, 255, (64, 256, 3), dtype=np.uint8)
    enc = encode_tiles(sam, img, SamTiling(1, 1, (64, 256)))
    hs, ws = enc.whole.grid  # 16 x 64 tokens, each 4x4 pixels of this image
    ty, tx = 5, 37
    amap = point_affinity(enc, sam, (64, 256), (tx * 4 + 1, ty * 4 + 2), "affinity", 1.2, True)
    row = affinity_rows(enc.whole, sam, ty * ws + tx, ty * ws + tx + 1, AggregateConfig())[0]
    want = F.interpolate(row.reshape(1, 1, hs, ws), size=(64, 256), mode="bilinear", align_corners=False)[0, 0]
    want = want.clamp_min(0) / want.max()
    assert amap.shape == (64, 256) and amap.max() == 1.0
    assert torch.allclose(amap, want, atol=1e-6)


def test_point_affinity_tiles_are_block_diagonal(sam):
    img = np.random.default_rng(1).integers(0, 255, (64, 256, 3), dtype=np.uint8)
    enc = encode_tiles(sam, img, SamTiling(1, 2, (64, 256)))
    amap = point_affinity(enc, sam, (64, 256), (200, 30), "attention", 1.2, True)
    assert amap[:, :128].abs().max() == 0 and amap[:, 128:].max() == 1.0
    right = enc.encodings[1]  # a 64x128 tile: 32x64 tokens, each 2x2 pixels
    hs, ws = right.grid
    ty, tx = 30 // 2, (200 - 128) // 2
    row = affinity_rows(right, sam, ty * ws + tx, ty * ws + tx + 1, AggregateConfig(correlation="attention"))[0]
    want = F.interpolate(row.reshape(1, 1, hs, ws), size=(64, 128), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(amap[:, 128:], want / want.max(), atol=1e-6)
    with pytest.raises(ValueError, match="of a 256x64 image, not of the 250x64 image"):
        point_affinity(enc, sam, (64, 250), (0, 0))


def test_mark_point_draws_only_near_the_point():
    rgb = torch.zeros(60, 80, 3)
    out = mark_point(rgb, (40, 30))
    changed = (out != rgb).any(-1)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert changed.any() and (ys - 30).abs().max() <= 6 and (xs - 40).abs().max() <= 6
    assert torch.equal(rgb, torch.zeros(60, 80, 3))  # the input is not modified
