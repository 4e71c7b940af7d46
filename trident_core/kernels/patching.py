"""Installing a forward on every module of a model that a test accepts (how each trick is applied)."""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn


def patch_forward(model: nn.Module, accepts: Callable[[nn.Module], bool], forward: Callable) -> int:
    """Bind `forward` as the forward of each module of `model` that `accepts`; returns how many."""
    count = 0
    for mod in model.modules():
        if accepts(mod):
            mod.forward = types.MethodType(forward, mod)
            count += 1
    return count
