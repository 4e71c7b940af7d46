"""The GELU of a transformer block's MLP computed in place on the CPU (the same kernels, the same values).

Its input is the first linear layer's fresh output, which nothing else reads, so a [tokens, 4·dim] tensor is not
allocated twice (SAM ViT-B: 50 MB per block). open_clip's QuickGELU, x sigmoid(1.702 x), keeps one such tensor
instead of three (CLIP ViT-B/16 on a chunk of 8 windows: 43 MB each)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .patching import patch_forward

MLP_CLASSES = ("Mlp", "MLPBlock")  # timm's ViT MLP (fc1, act, fc2) and segment_anything's (lin1, act, lin2)
QUICK_GELU = "QuickGELU"  # open_clip's, between c_fc and c_proj of a block's `mlp` (an nn.Sequential)


def _gelu_forward_in_place(self: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        return torch.ops.aten.gelu_(x, approximate=self.approximate)
    return F.gelu(x, approximate=self.approximate)


def _quick_gelu_forward_in_place(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's `x * torch.sigmoid(1.702 * x)` with the same three kernels, the last two in place."""
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        return x.mul_(torch.sigmoid_(1.702 * x))
    return x * torch.sigmoid(1.702 * x)


def use_gelu_in_place(model: nn.Module) -> int:
    """Give the GELU of every timm / segment_anything MLP block, and open_clip's QuickGELU of every block's MLP,
    the in-place forward; returns how many."""
    acts = nn.ModuleList(m.act for m in model.modules()
                         if type(m).__name__ in MLP_CLASSES and isinstance(getattr(m, "act", None), nn.GELU))
    quick = nn.ModuleList(m.gelu for m in model.modules() if isinstance(m, nn.Sequential)
                          and type(getattr(m, "gelu", None)).__name__ == QUICK_GELU and hasattr(m, "c_fc"))
    return (patch_forward(acts, lambda m: isinstance(m, nn.GELU), _gelu_forward_in_place)
            + patch_forward(quick, lambda m: type(m).__name__ == QUICK_GELU, _quick_gelu_forward_in_place))
