"""How the models compute where their weights are not all float32 (models/conversion.py keeps them so).

- `norm32`, `linear32`: the last norms and projections whose outputs Trident's own maths reads (CLIP's values,
  out-projection and joint-space projection, SAM's last q, k, v) run in float32 whatever the weights' dtype: a
  small part of the work, and rounding them would add to every threshold's error. With float32 weights each is
  exactly the module's own call (the same kernel on the same tensors).
- Pairs: a weight matrix kept as hi + lo in bfloat16 (`conversion.split_pair`) is multiplied in two bfloat16
  products summed in float32. A matrix rounded to bfloat16 alone shifts every token the same way (measured on CLIP:
  1.2 % of city_scapes' labels moved, 0.1 % with pairs); the rounding of the activations varies from token to token
  and averages out. `use_pairs` gives the linear layers and self-attentions holding pairs a forward that takes and
  returns float32 (the residual stream and the norms stay float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear
from ..kernels.patching import patch_forward
from .conversion import LO


def norm32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` computed and returned in float32."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


def linear32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed and returned in float32."""
    return linear(x.float(), weight.float(), None if bias is None else bias.float())


def pair_linear(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (hi + lo)ᵀ + bias in float32, from two products of x rounded to the pair's dtype."""
    xl = x.to(hi.dtype)
    out = F.linear(xl, hi).float().add_(F.linear(xl, lo))
    return out if bias is None else out.add_(bias)


def attach_pairs(model: nn.Module, lows: dict[str, torch.Tensor]) -> None:
    """Each pair's second tensor (`<parameter>_lo` of the state dict) as a buffer beside its parameter."""
    for key, t in lows.items():
        owner, _, name = key.rpartition(".")
        model.get_submodule(owner).register_buffer(name, t, persistent=False)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return pair_linear(x, self.weight, getattr(self, "weight" + LO), self.bias)


def _attention_forward(self: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                       attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                       is_causal: bool = False) -> tuple[torch.Tensor, None]:
    """Batch-first self-attention (an image tower's: no mask) with pair projections and the attention itself in
    float32: q, k, v rounded to bfloat16 moved 0.26 % of the golden city_scapes pair's labels, and the kernel is no
    slower in float32 on an AVX512-BF16 CPU (AMD Zen 5: 17 ms either way per window chunk)."""
    if not (query is key is value and self.batch_first and key_padding_mask is None and attn_mask is None):
        raise ValueError("pair weights run batch-first self-attention without masks only")
    b, n, d = query.shape
    heads, hi = self.num_heads, self.in_proj_weight
    qkv = pair_linear(query, hi, getattr(self, "in_proj_weight" + LO), self.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).transpose(1, 2).reshape(b, n, d)
    out = self.out_proj
    return pair_linear(o, out.weight, getattr(out, "weight" + LO), out.bias), None


def use_pairs(model: nn.Module) -> int:
    """Give the linear layers and self-attentions of `model` that hold pairs the forwards above; how many."""
    return (patch_forward(model, lambda m: isinstance(m, nn.Linear) and hasattr(m, "weight" + LO), _linear_forward)
            + patch_forward(model, lambda m: isinstance(m, nn.MultiheadAttention)
                            and hasattr(m, "in_proj_weight" + LO), _attention_forward))
