"""S2: the sliding-window plan over the processed image (window 336, stride 224 by default)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowPlan:
    """Windows as pixel boxes (y1, x1, y2, x2) over an image of `size` (H, W), row-major."""

    size: tuple[int, int]
    window: int
    stride: int
    grid: tuple[int, int]
    boxes: tuple[tuple[int, int, int, int], ...]

    def __len__(self) -> int:
        return len(self.boxes)


def _starts(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    n = max(length - window + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + window, length)
        out.append((max(end - window, 0), end))
    return out


def plan_windows(size: tuple[int, int], window: int = 336, stride: int = 224) -> WindowPlan:
    """Grid `max(L - window + stride - 1, 0) // stride + 1` per side; the last window is shifted back inside."""
    if window <= 0 or not 0 < stride <= window:
        raise ValueError(f"window ({window}) must be positive and stride ({stride}) from 1 to the window: a larger "
                         "stride leaves gaps between windows")
    h, w = size
    rows, cols = _starts(h, window, stride), _starts(w, window, stride)
    boxes = tuple((y1, x1, y2, x2) for y1, y2 in rows for x1, x2 in cols)
    return WindowPlan((h, w), window, stride, (len(rows), len(cols)), boxes)
