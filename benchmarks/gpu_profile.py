#!/usr/bin/env python
"""Where a frame batch's time goes on a GPU: what to change next for issue #25 (docs/gpu.md, "Measured").

Trident Segment's node code (as gpu_check runs it) on a batch of frames without refinement, in one process:
1. images/s and peak GPU memory of the GPU variants against each other, alternating, best of --reps (the lent
   hosts' speeds differ, so only variants timed in one process compare): all heads at once in the affinity or
   one at a time (`sam_affinity.heads_at_once`);
2. the calls that synchronise the host with the GPU (each empties its queue), by where in the pack they are made,
   for one forward's frames (`torch.cuda.set_sync_debug_mode`);
3. CPU tensors of more than one element meeting CUDA tensors (a blocking copy each), by where;
4. torch.profiler's table of the batch, by GPU time, the span of each stage on the GPU, and the host's CUDA
   calls (launches, synchronisations);
5. the host's time by Python function (cProfile: cumulative, then own time), where launching and waiting go.
On the CPU (`--device cpu`, the tests' small models, tiny frames) only the timings run: a test of the script.

    python benchmarks/gpu_profile.py [--device cuda] [--ckpt-dir DIR] [--frames 32] [--size 448] [--reps 2]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
PACK = (str(ROOT / "trident_core"), str(ROOT / "nodes"))  # where the calls counted are made
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from pack_import import core  # noqa: E402

# the variants: heads at once in the affinity or not, the first the code's own choice
VARIANTS = {"heads at once": True, "one head at a time": False}
# the pipeline's stages, timed as profiler ranges (the rest of the node's time: its outputs)
STAGES = ("compute_frame_window_features", "encode_frames", "compute_feature_map", "classify")


def where(skip: int) -> str:
    """The innermost frames of the pack on the stack (file:line), innermost first."""
    frames = [f for f in traceback.extract_stack()[:-skip] if f.filename.startswith(PACK)]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[::-1][:4]) or "?"


class CpuMeetsCuda(TorchFunctionMode):
    """Counts calls that take a CPU tensor of more than one element beside a CUDA tensor, and copies onto CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else [a])]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", str(func))
        mixed = (any(t.device.type == "cpu" and t.dim() > 0 for t in tensors)
                 and any(t.device.type == "cuda" for t in tensors))
        onto = name in ("to", "cuda") and tensors and tensors[0].device.type == "cpu" and any(
            "cuda" in str(a) for a in (*args[1:], *kwargs.values()) if not isinstance(a, torch.Tensor))
        if mixed or onto:
            self.counts[f"{name} at {where(2)}"] += 1
        return func(*args, **kwargs)


def timings(run: Callable[[], list], device: torch.device, reps: int) -> dict[str, tuple[float, float, float]]:
    """(seconds, peak GPU MB) of each variant, the best of `reps` rounds in which the variants alternate, and the
    percent of its labels equal to the first variant's."""
    affinity = core("sam_affinity")
    own = affinity.heads_at_once
    best = dict.fromkeys(VARIANTS, (float("inf"), 0.0))
    labels: dict[str, list[torch.Tensor]] = {}
    try:
        for _ in range(reps):
            for name, heads in VARIANTS.items():
                affinity.heads_at_once = (lambda d, heads=heads: heads and own(d))
                gpu_check.free_memory(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                segs = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
                best[name] = min(best[name], (seconds, peak))
                labels.setdefault(name, [seg.labels for seg in segs])
    finally:
        affinity.heads_at_once = own
    first = labels[next(iter(VARIANTS))]
    total = sum(t.numel() for t in first)
    return {name: (*best[name], 100 * sum(int((a == b).sum()) for a, b in zip(labels[name], first)) / total)
            for name in VARIANTS}


def stage_ranges() -> None:
    """Each of the pipeline's STAGES inside a profiler range of its name (for the profile's stage table)."""
    pipeline = core("pipeline")

    def ranged(name: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            with torch.profiler.record_function(f"stage {name}"):
                return fn(*args, **kwargs)
        return run

    for name in STAGES:
        setattr(pipeline, name, ranged(name, getattr(pipeline, name)))


def synchronising_calls(run: Callable[[], object]) -> collections.Counter:
    """Where the calls that synchronise the host with the GPU are made, counted over one run of `run`."""
    found: collections.Counter = collections.Counter()

    def show(message, *_args, **_kwargs) -> None:
        if "synchroniz" in str(message):
            found[where(2)] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ckpt-dir", help="where the random checkpoints are (built there once)")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=448, help="square frames of this side")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    plan = gpu_check.Plan.make(args.device, not cuda)
    if not cuda:
        gpu_check.force_frames_per_forward(2)  # (frames share forwards as on a GPU)
    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else Path(tempfile.mkdtemp(prefix="trident_gpu_profile_"))
    node = gpu_check.SegmentNode(gpu_check.checkpoints(plan, ckpt), plan)
    batch = gpu_check.frames((args.size, args.size), args.frames)
    node(batch[:2], False)  # warm-up
    for name, (seconds, peak, same) in timings(lambda: node(batch, False), device, args.reps).items():
        print(f"[time] {name}: {args.frames} frames of {args.size}x{args.size} in {seconds:.3f} s = "
              f"{args.frames / seconds:.1f} images/s, peak {peak:.0f} MB, labels {same:.4f} % the first's",
              flush=True)
    if not cuda:
        return 0
    per_forward = min(args.frames, node.frames_per_forward((args.size, args.size)))
    syncs = synchronising_calls(lambda: node(batch[:per_forward], False))
    print(f"[syncs] {sum(syncs.values())} synchronising calls for {per_forward} frames, by where:")
    for at, count in syncs.most_common(30):
        print(f"  {count:5d} {at}")
    mode = CpuMeetsCuda()
    with mode:
        node(batch[:per_forward], False)
    print(f"[copies] {sum(mode.counts.values())} CPU tensors meeting CUDA for {per_forward} frames, by where:")
    for at, count in mode.counts.most_common(30):
        print(f"  {count:5d} {at}")
    host = cProfile.Profile()
    host.enable()
    node(batch, False)
    torch.cuda.synchronize()
    host.disable()
    for order, rows in (("cumulative", 70), ("tottime", 35)):
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats(order).print_stats(rows)
        print(f"[host by function, {order}]\n" + text.getvalue().split("\n\n", 2)[-1])
    stage_ranges()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        with torch.profiler.record_function("stage node"):
            node(batch, False)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=50))
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::copy_", "aten::cat")]
    print("[copies] aten::copy_ and aten::cat by input shapes, by GPU time:")
    for e in sorted(by_shape, key=lambda e: -getattr(e, "device_time_total", 0))[:15]:
        print(f"  {e.key} x{e.count}: GPU {getattr(e, 'device_time_total', 0) / 1e3:.1f} ms, {e.input_shapes}")
    calls = {e.key: e for e in averages}
    for key in ("stage node", *(f"stage {name}" for name in STAGES)):
        if key in calls:
            e = calls[key]
            print(f"[stage] {key[6:]}: {e.count} calls, host {e.cpu_time_total / 1e3:.1f} ms, "
                  f"GPU {getattr(e, 'device_time_total', 0) / 1e3:.1f} ms")
    for key in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaLaunchKernel", "cudaLaunchKernelExC"):
        if key in calls:
            print(f"[host] {key}: {calls[key].count} calls, {calls[key].cpu_time_total / 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
