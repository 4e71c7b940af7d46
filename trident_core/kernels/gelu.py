"""The GELU of a transformer block's MLP computed in place on the CPU (the same kernel, the same values).

Its input is the first linear layer's fresh output, which nothing else reads, so a [tokens, 4·dim] tensor is not
allocated twice (SAM ViT-B: 50 MB per block)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .patching import patch_forward

MLP_CLASSES = ("Mlp", "MLPBlock")  # timm's ViT MLP (fc1, act, fc2) and segment_anything's (lin1, act, lin2)


def _gelu_forward_in_place(self: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        return torch.ops.aten.gelu_(x, approximate=self.approximate)
    return F.gelu(x, approximate=self.approximate)


def use_gelu_in_place(model: nn.Module) -> int:
    """Give the GELU of every timm / segment_anything MLP block the in-place forward; returns how many."""
    acts = nn.ModuleList(m.act for m in model.modules()
                         if type(m).__name__ in MLP_CLASSES and isinstance(getattr(m, "act", None), nn.GELU))
    return patch_forward(acts, lambda m: isinstance(m, nn.GELU), _gelu_forward_in_place)
