"""Unmapping the resident pages of memory-mapped weights: memory goes down, values never change, and memory that
is not a clean file mapping (anonymous, written) is left alone."""

from __future__ import annotations

import sys

import pytest
import torch

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
