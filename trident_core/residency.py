"""Give back the resident pages of memory-mapped weights that a stage has finished with (Linux, CPU).

The checkpoints are memory-mapped and their tensors become the weights (checkpoints.py), so a model's weights are
pages of the file's page cache mapped into the process: resident once read, counted in its memory. After a stage,
`release(module)` unmaps those pages (madvise MADV_DONTNEED on the file-backed, never-written mappings only); the
weights stay valid, and the next use maps them again from the page cache (minor faults, no disk read, no copy).
Values are untouched, so results stay bit for bit; what changes is that the process's peak holds the weights of
the stage running, not those of every stage run before it. Weights in anonymous memory (a converted dtype, a file
read without mmap, a GPU) are left alone: there, dropping pages would lose them."""

from __future__ import annotations

import ctypes
import mmap
import sys
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private file mappings that hold no written page (no anonymous copy-on-write
    page), sorted."""
    spans, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
                current = None
                if len(head) == 6 and head[4] != "0" and head[5].strip().startswith("/") and head[1][3] == "p":
                    current = tuple(int(x, 16) for x in head[0].split("-"))
            elif current and head[0] == "Anonymous:":  # pages copied on write: these must not be dropped
                if head[1] == "0":
                    spans.append(current)
                current = None
    return sorted(spans)


def release(tensors: Iterable[torch.Tensor] | nn.Module, spans: Sequence[tuple[int, int]] | None = None) -> int:
    """Unmap the resident pages of the memory-mapped CPU tensors given (a module: its parameters and buffers);
    returns the bytes advised. A no-op off Linux and for tensors that are not file-backed. `spans`: the file
    mappings as `_file_mappings` read them, where the caller has them (`releaser`)."""
    if not sys.platform.startswith("linux"):
        return 0
    if isinstance(tensors, nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    spans = _file_mappings() if spans is None else spans
    starts = [s for s, _ in spans]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    done = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        i = bisect_right(starts, lo) - 1
        if i < 0 or hi > spans[i][1]:
            continue  # not inside one file mapping
        a, b = (lo + _PAGE - 1) // _PAGE * _PAGE, hi // _PAGE * _PAGE  # whole pages only: neighbours are kept
        if b > a and libc.madvise(a, b - a, _MADV_DONTNEED) == 0:
            done += b - a
    return done


def trim_heap() -> bool:
    """Give the allocator's free heap pages back to the system (glibc's malloc_trim): a stage's freed activations
    are otherwise kept by the process and the next stage, whose blocks have other sizes, adds to them. Returns
    whether it ran (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # another C library (musl)
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim(0)
    return True


def releaser() -> Callable[[Iterable[torch.Tensor] | nn.Module], int]:
    """`release` with the file mappings read once, now: for many calls within one stage (reading them takes about
    12 ms), on tensors mapped before this call."""
    spans = _file_mappings() if sys.platform.startswith("linux") else []
    return lambda tensors: release(tensors, spans)
