"""Every speed and memory trick of the pack, applied to a model by one call (`apply`) when it is loaded and
switched off by one setting (TRIDENT_KERNELS=0), so the stage code reads as plain PyTorch.

- `exact_linear`: float32 linear layers (and SAM's attention and value-cosine products) through oneDNN, bit for
  bit PyTorch's `F.linear`, where a timing probe measured it faster on this host.
- `sam_attention`: SAM's encoder attention a band of query rows at a time (no [heads, N, N] tensor; bit-identical
  on the CPU).
- `clip_attention`: CLIP's self-attention through `scaled_dot_product_attention` where measured faster (equal up
  to rounding).
- `gelu`: the MLP blocks' GELU in place (same values, one [tokens, 4·dim] tensor less).
- `timing`: the per-host, per-shape decisions and what each saved (`report`).

Why exactness matters: DINO's proxy attention and SAM's affinity threshold their inputs, so a last-bit difference
in a product can flip an entry (measured: up to 2.6e-4 on the logits), and the reference's numbers are the target.
Every trick on a path that meets a threshold therefore reproduces PyTorch's own result bit for bit; only CLIP's
attention, whose outputs meet none, is allowed float rounding."""

from __future__ import annotations

from torch import nn

from .clip_attention import use_fast_self_attention
from .exact_linear import linear, use_exact_linear
from .gelu import use_gelu_in_place
from .sam_attention import attention_probs, rel_pos_table, use_banded_attention
from .switch import ENV, enabled
from .timing import report

__all__ = ["ENV", "apply", "attention_probs", "enabled", "linear", "rel_pos_table", "report"]


def apply(model: nn.Module) -> dict[str, int]:
    """Every trick that fits a loaded model's modules (none when switched off); how many modules each patched."""
    if not enabled():
        return {}
    return {"exact_linear": use_exact_linear(model), "clip_attention": use_fast_self_attention(model),
            "sam_attention": use_banded_attention(model), "gelu": use_gelu_in_place(model)}
