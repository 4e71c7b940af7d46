"""A batch of frames' aggregation (S7) as CUDA graphs: captured at the first frame of each shape, replayed for
the others.

On a GPU one frame's affinity is a few hundred small kernels that the host launches one by one, and those
launches took most of the host's time per frame (issue #25's profile, docs/gpu.md); a graph replays them in one
launch. The kernels are the same, so the values are eager's bit for bit. The graphs, their inputs and their
memory pool live as long as the `FrameAggregation` (one `Trident.segment_frames` call): nothing stays on the GPU
after the batch."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .aggregation import aggregate
from .config import AggregateConfig
from .models import SamEncoding, SamModel

logger = logging.getLogger(__name__)

Capture = Callable[[Callable[[], torch.Tensor]], tuple[torch.Tensor, torch.Tensor, Callable[[], None]]]


def capture_cuda_graph(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Callable[[], None]]:
    """fn run once on a side stream (warming up cuBLAS and the caches fn reads), then captured: (the warm-up's
    result, the graph's output tensor, its replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        first = fn()
    torch.cuda.current_stream().wait_stream(stream)
    first.record_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return first, out, graph.replay


def graphs_usable(device: torch.device) -> bool:
    """Whether frames' aggregations are replayed from CUDA graphs on `device` (CUDA only: elsewhere launches are
    cheap or graphs do not exist)."""
    return device.type == "cuda"


@dataclass
class _Graph:
    inputs: tuple[torch.Tensor, ...]  # the static q, k, v and features the graph reads: each frame's copied in
    out: torch.Tensor  # the graph's result, overwritten by every replay
    replay: Callable[[], None]
    keep: tuple[torch.Tensor, ...]  # tensors made outside the graph that it reads (SAM's relative-position tables)


class FrameAggregation:
    """`aggregation.aggregate` for the frames of one batch: on a CUDA GPU each shape's aggregation is captured
    once and replayed; elsewhere (or where a capture fails) it is `aggregate` itself. Call it as `aggregate`."""

    def __init__(self, capture: Capture | None = None, usable: Callable[[torch.device], bool] | None = None):
        self.capture = capture or capture_cuda_graph
        self.usable = usable or graphs_usable
        self.graphs: dict[tuple, _Graph | None] = {}  # None: that shape's capture failed, eager from then on

    def __call__(self, enc: SamEncoding, sam: SamModel, feats: torch.Tensor, config: AggregateConfig) -> torch.Tensor:
        if config.correlation == "none" or not self.usable(enc.q.device):
            return aggregate(enc, sam, feats, config)
        feats = feats.float().to(enc.q.device)
        key = (id(sam), enc.q.shape, enc.k.shape, enc.v.shape, enc.padded_grid, enc.grid, feats.shape,
               enc.q.device, config)
        if key not in self.graphs:
            return self._capture(key, enc, sam, feats, config)
        graph = self.graphs[key]
        if graph is None:
            return aggregate(enc, sam, feats, config)
        for static, t in zip(graph.inputs, (enc.q, enc.k, enc.v, feats)):
            static.copy_(t)
        graph.replay()
        return graph.out.clone()

    def _capture(self, key: tuple, enc: SamEncoding, sam: SamModel, feats: torch.Tensor,
                 config: AggregateConfig) -> torch.Tensor:
        """This frame's aggregation, capturing its shape's graph on the way (static copies of its inputs)."""
        inputs = tuple(t.clone() for t in (enc.q, enc.k, enc.v, feats))
        static = dataclasses.replace(enc, q=inputs[0], k=inputs[1], v=inputs[2])
        keep = sam.relative_tables(enc.padded_grid) if sam.model.image_encoder.blocks[-1].attn.use_rel_pos else ()
        try:
            first, out, replay = self.capture(lambda: aggregate(static, sam, inputs[3], config))
        except RuntimeError as err:  # (a kernel that cannot be captured, or no memory for the graph's pool)
            logger.info("the aggregation is not replayed from a CUDA graph (%s); it runs as it is",
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            self.graphs[key] = None
            return aggregate(enc, sam, feats, config)
        self.graphs[key] = _Graph(inputs, out, replay, tuple(keep))
        return first
