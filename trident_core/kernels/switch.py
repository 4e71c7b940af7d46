"""The one setting that turns every kernel and patch off: TRIDENT_KERNELS=0 (models then run the libraries' own
forwards on PyTorch's kernels, to bisect a difference)."""

from __future__ import annotations

import os

ENV = "TRIDENT_KERNELS"


def enabled() -> bool:
    """Whether the kernels and patches are wanted (read when a model is loaded and per product)."""
    return os.environ.get(ENV, "1").strip() != "0"
