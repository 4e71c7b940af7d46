"""A compact segmentation gives back exactly the labels it was made from, also near a tie or the threshold where
the float16 copy of a refined probability map would round two classes together."""

from __future__ import annotations

import torch

from trident_core.classes import parse_classes
from trident_core.classify import Segmentation, class_probs, labels_from_probs, upsample
from trident_core.compact import compact


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
