"""The core against the authors' reference: golden outputs of ../shared/reference-golden on its four cases.

Runs through the same entry point users have (the preset's parameters, the case's classes, refinement on or off,
float32 on CPU). Tolerances from the golden README: logits 1e-4, text 1e-5, labels >= 99.9 % before refinement
and >= 99 % after it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import GOLDEN

from trident_core import ClassList, get_preset, parse_classes
from trident_core.classes import read_class_file

CASES = json.loads((GOLDEN / "cases.json").read_text()) if GOLDEN.is_dir() else []


def _classes(case: dict) -> ClassList:
    preset = get_preset(case["preset"])
    text = read_class_file(str(GOLDEN / case["classes_file"])) if "classes_file" in case else case["classes"]
    return ClassList(parse_classes(text).classes, preset.background)


def _explain_labels(ref: np.ndarray, ours: np.ndarray, names: list[str]) -> str:
    diff = ref != ours
    pairs, counts = np.unique(np.stack([ref[diff], ours[diff]]), axis=1, return_counts=True)
    top = sorted(zip(counts, pairs.T.tolist()), reverse=True)[:5]
    return (f"{diff.sum()} of {diff.size} labels differ ({100 * diff.mean():.3f} %); reference -> ours: "
            + ", ".join(f"{names[a] if a >= 0 else a}->{names[b] if b >= 0 else b}: {n}" for n, (a, b) in top))


def _max_diff(ref: np.ndarray, ours: np.ndarray) -> str:
    d = np.abs(ref - ours)
    return f"max |diff| {d.max():.3e} at {np.unravel_index(d.argmax(), d.shape)} (mean {d.mean():.3e})"


@pytest.fixture(scope="module", params=[c["name"] for c in CASES] or ["no-golden"])
def case_result(request, full_trident):
    if not CASES:
        pytest.skip("../shared/reference-golden is absent")
    case = next(c for c in CASES if c["name"] == request.param)
    preset = get_preset(case["preset"])
    classes = _classes(case)
    seg = full_trident.segment(str(GOLDEN / case["image"]), classes, preset.params.update(refine=case["refine"]))
    return case, classes, seg, np.load(GOLDEN / case["golden"])


def test_text_embeddings(case_result, full_trident):
    case, classes, _, gold = case_result
    assert list(gold["query_words"]) == classes.queries
    assert list(gold["query_idx"]) == classes.query_class
    ours = full_trident.text(classes).cpu().numpy()
    assert np.abs(ours - gold["query_features"]).max() < 1e-5, _max_diff(gold["query_features"], ours)


def test_logits(case_result):
    case, _, seg, gold = case_result
    ref_grid = gold["grid_logits"]
    assert tuple(seg.grid_logits.shape) == ref_grid.shape, f"grid {tuple(seg.grid_logits.shape)} != {ref_grid.shape}"
    grid = seg.grid_logits.cpu().numpy()
    assert np.abs(grid - ref_grid).max() < 1e-4, _max_diff(ref_grid, grid)
    h, w = case["image_size_hw"]
    ref_full = torch.nn.functional.interpolate(torch.from_numpy(ref_grid)[None], size=(h, w), mode="bilinear",
                                               align_corners=False)[0].cpu().numpy()
    ours_full = seg.logits().cpu().numpy()
    assert np.abs(ours_full - ref_full).max() < 1e-4, _max_diff(ref_full, ours_full)


def test_labels(case_result):
    case, classes, seg, gold = case_result
    coarse_ref = gold["labels_coarse"] if case["refine"] else gold["labels"]
    coarse = (seg.labels_coarse if case["refine"] else seg.labels).cpu().numpy()
    assert (coarse == coarse_ref).mean() >= 0.999, _explain_labels(coarse_ref, coarse, classes.names)
    if case["refine"]:
        assert seg.refined
        ours = seg.labels.cpu().numpy()
        assert (ours == gold["labels"]).mean() >= 0.99, _explain_labels(gold["labels"], ours, classes.names)
        # the refinement must actually have changed something where the reference's did
        assert (gold["labels"] != gold["labels_coarse"]).any() == (ours != coarse).any()
