"""A compact segmentation gives back exactly the labels it was made from, also near a tie or the threshold where
the float16 copy of a refined probability map would round two classes together."""

from __future__ import annotations

import dataclasses

import torch

from trident_core.aggregation import FeatureMap
from trident_core.classes import parse_classes
from trident_core.classify import Segmentation, class_probs, classify, labels_from_probs, plain_probs, upsample
from trident_core.compact import compact
from trident_core.config import ClassifyConfig
from trident_core.pamr import Pamr


def _classified(config: ClassifyConfig, pamr: Pamr | None = None, seed: int = 0) -> Segmentation:
    """classify of a random 6x5 feature map and three classes, at 24x20."""
    gen = torch.Generator().manual_seed(seed)
    fm = FeatureMap(torch.nn.functional.normalize(torch.randn(16, 6, 5, generator=gen), dim=0), (24, 20),
                    "splice_then_segment", "affinity", (1, 1))
    text = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=1)
    return classify(fm, text, parse_classes("sky, sea, sand"), config, pamr)


def test_coarse_labels_near_a_tie_survive_compaction():
    classes = parse_classes("horse, pony")
    grid = torch.zeros(2, 4, 4)
    grid[1] = 1e-6  # pony ahead of horse by 2e-5 in probability: equal once rounded to float16
    size = (8, 8)
    base = class_probs(upsample(grid, size), classes, 40.0)
    coarse_labels = labels_from_probs(base, classes, 0.0)
    assert (coarse_labels == 1).all() and torch.equal(base.half()[0], base.half()[1])
    refined_coarse = base * (1 - 1e-6)  # (a map that differs from the recomputation: kept in float16)
    seg = Segmentation(coarse_labels.clone(), base.clone(), grid, classes, size, coarse_labels, refined_coarse)
    small = compact(seg, 40.0, 0.0)
    assert small.stored_probs_coarse is not None
    assert torch.equal(small.labels_coarse.long(), coarse_labels)


def test_classifys_own_probabilities_are_not_recomputed(monkeypatch):
    """Probabilities that are the very tensor classify made from its logits (no PAMR) are dropped without the
    recomputation and comparison (on a GPU a wait for its queue per frame); a copy, or another logit scale, is
    still compared, and a changed map still kept."""
    from trident_core import compact as compact_module

    config = ClassifyConfig()
    seg = _classified(config)
    classes = seg.classes
    assert plain_probs(seg, config.logit_scale) and not plain_probs(seg, config.logit_scale + 1)
    assert not plain_probs(dataclasses.replace(seg, probs=seg.probs.clone()), config.logit_scale)
    # classify's probabilities beside other logits, or another frame's beside these: not the recomputation
    other = _classified(config, seed=5)
    assert not plain_probs(dataclasses.replace(seg, grid_logits=other.grid_logits), config.logit_scale)
    assert not plain_probs(dataclasses.replace(seg, probs=other.probs), config.logit_scale)
    swapped = dataclasses.replace(seg, grid_logits=other.grid_logits)
    assert torch.allclose(compact(swapped, config.logit_scale, config.prob_thd).probs, seg.probs, atol=1e-3)
    recomputed = []
    real = compact_module.class_probs
    monkeypatch.setattr(compact_module, "class_probs", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    assert compact(seg, config.logit_scale, config.prob_thd).stored_probs is None and recomputed == []
    copy = Segmentation(seg.labels, seg.probs.clone(), seg.grid_logits, classes, seg.image_size)
    assert compact(copy, config.logit_scale, config.prob_thd).stored_probs is None and recomputed == [1]
    changed = Segmentation(seg.labels, seg.probs * 0.5, seg.grid_logits, classes, seg.image_size)
    assert compact(changed, config.logit_scale, config.prob_thd).stored_probs is not None
    other_scale = compact(seg, config.logit_scale * 2, config.prob_thd)
    assert other_scale.stored_probs is not None  # (recomputed at that scale: not these probabilities)


def test_probabilities_after_pamr_are_kept():
    """PAMR's probabilities are not the logits' own: never taken for classify's plain ones, so compaction keeps
    them."""
    config = ClassifyConfig()
    seg = _classified(config, Pamr(3, (1, 2), torch.rand(3, 24, 20, generator=torch.Generator().manual_seed(1))))
    assert not plain_probs(seg, config.logit_scale)
    small = compact(seg, config.logit_scale, config.prob_thd)
    assert small.stored_probs is not None and torch.allclose(small.probs, seg.probs, atol=1e-3)
