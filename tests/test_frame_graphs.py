"""A batch's aggregations replayed from captured graphs (`frame_graphs`; CUDA only, so here with a stand-in capture
that replays by recomputing from the graph's static inputs into its output tensor, as a CUDA graph does): each
frame's result equals `aggregate` on that frame, bit for bit, earlier results are never overwritten, one capture
per shape, and a failed capture falls back to `aggregate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trident_core import Params, frame_graphs
from trident_core.aggregation import aggregate
from trident_core.config import AggregateConfig
from trident_core.frame_graphs import FrameAggregation

CLASSES = "sky, person; astronaut, flag"


class StandIn:
    """A capture whose replay recomputes fn (which reads the static inputs) into the captured output in place."""

    def __init__(self, fail: bool = False):
        self.captures, self.replays, self.fail = 0, 0, fail

    def __call__(self, fn):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        first, out = fn(), fn()

        def replay():
            self.replays += 1
            out.copy_(fn())
        return first, out, replay


def _frames(photo: np.ndarray, n: int, size=(64, 96)) -> list[np.ndarray]:
    return [np.ascontiguousarray(photo[25 * i:25 * i + size[0], 15 * i:15 * i + size[1]]) for i in range(n)]


@pytest.mark.parametrize("correlation", ["affinity", "cosine", "attention"])
def test_replays_equal_aggregate_and_keep_earlier_results(small_trident, photo, correlation):
    sam, config = small_trident.sam, AggregateConfig(correlation=correlation)
    frames = _frames(photo, 3) + _frames(photo, 2, (80, 64))
    encs = [sam.encode(f) for f in frames]
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(e.grid[0] * e.grid[1], 24, generator=gen) for e in encs]
    capture = StandIn()
    agg = FrameAggregation(capture, usable=lambda _device: True)
    got = [agg(e, sam, f, config) for e, f in zip(encs, feats)]
    kept = [g.clone() for g in got]
    assert capture.captures == 2 and capture.replays == 3  # a graph per frame size; the others replayed
    for g, k, e, f in zip(got, kept, encs, feats):
        assert torch.equal(g, aggregate(e, sam, f, config))  # each frame's own inputs, not the first frame's
        assert torch.equal(g, k)  # (a later replay never writes into a result handed out)
    assert not torch.equal(got[0], got[1])


def test_a_failed_capture_runs_aggregate_from_then_on(small_trident, photo):
    sam, config = small_trident.sam, AggregateConfig()
    encs = [sam.encode(f) for f in _frames(photo, 3)]
    feats = [torch.randn(e.grid[0] * e.grid[1], 24) for e in encs]
    capture = StandIn(fail=True)
    agg = FrameAggregation(capture, usable=lambda _device: True)
    for e, f in zip(encs, feats):
        assert torch.equal(agg(e, sam, f, config), aggregate(e, sam, f, config))
    assert capture.captures == 1  # (not tried again for every frame)


def test_not_on_the_cpu_and_not_without_an_affinity(small_trident, photo):
    sam = small_trident.sam
    enc = sam.encode(_frames(photo, 1)[0])
    feats = torch.randn(enc.grid[0] * enc.grid[1], 24)
    capture = StandIn()
    agg = FrameAggregation(capture)  # (the CPU: graphs_usable says no)
    assert torch.equal(agg(enc, sam, feats, AggregateConfig()), aggregate(enc, sam, feats, AggregateConfig()))
    agg = FrameAggregation(capture, usable=lambda _device: True)
    assert torch.equal(agg(enc, sam, feats, AggregateConfig(correlation="none")), feats)
    assert capture.captures == 0


def test_segment_frames_replays_a_batch_with_the_same_results(small_trident, photo, monkeypatch):
    frames = _frames(photo, 4)
    params = Params().update(refine=False)
    alone = [small_trident.segment(f, CLASSES, params) for f in frames]
    capture = StandIn()
    monkeypatch.setattr(frame_graphs, "capture_cuda_graph", capture)
    monkeypatch.setattr(frame_graphs, "graphs_usable", lambda _device: True)
    got = list(small_trident.segment_frames(frames, CLASSES, params, per_forward=2))
    assert capture.captures == 1 and capture.replays == 3  # one graph for the batch, not one per group
    for seg, ref in zip(got, alone):
        assert (seg.labels == ref.labels).float().mean() >= 0.999
        assert torch.allclose(seg.probs, ref.probs, atol=2e-5)
