"""A faster forward for the self-attention CLIP's towers run (nn.MultiheadAttention, batch first, on the CPU).

PyTorch's own paths are slow there: its fast path multiplies q and k with MKL's batched kernel (a quarter of the
CPU's speed) and its general path runs the in-projection of a transposed input as a batched product with a
broadcast weight. This one runs the in-projection through `exact_linear.linear`, `scaled_dot_product_attention`,
and the out-projection through `exact_linear.linear`. Equal up to float rounding (CLIP's outputs meet no
threshold), so it runs only for shapes where it was measured faster here (`timing.decide`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import timing
from .exact_linear import linear
from .patching import patch_forward


def _attention(self: nn.MultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    b, n, d = x.shape
    heads = self.num_heads
    qkv = linear(x, self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # MultiheadAttention's True means "masked out"
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_mask is None else attn_mask.to(q.dtype))
    return linear(o.transpose(1, 2).reshape(b, n, d), self.out_proj.weight, self.out_proj.bias)


def _key(x: torch.Tensor, heads: int, masked: bool) -> str:
    """Decisions per dtype, width, heads and token count rounded up to 32 (CLIP's windows and trimmed prompts)."""
    dtype = "" if x.dtype == torch.float32 else f" {str(x.dtype).removeprefix('torch.')}"  # float32: the keys kept
    return f"clip self-attention{dtype} D={x.shape[-1]} heads={heads} L={-(-x.shape[1] // 32) * 32} mask={masked}"


def _self_attention_forward(self: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                            need_weights: bool = True, attn_mask: torch.Tensor | None = None,
                            average_attn_weights: bool = True, is_causal: bool = False):
    """nn.MultiheadAttention.forward, with batch-first CPU self-attention through `_attention` where faster."""
    simple = (query is key and key is value and query.dim() == 3 and query.device.type == "cpu"
              and self.batch_first and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
              and key_padding_mask is None and not need_weights and not is_causal and not self.training
              and (attn_mask is None or attn_mask.dim() == 2))

    def torch_path():
        return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)

    if not simple:
        return torch_path()
    decision = timing.decide(_key(query, self.num_heads, attn_mask is not None),
                             lambda: (lambda: _attention(self, query, attn_mask), torch_path))
    decision.work += 1
    if not decision.use_ours:
        return torch_path()
    return _attention(self, query, attn_mask), None


def use_fast_self_attention(model: nn.Module) -> int:
    """Give every nn.MultiheadAttention of a model the forward above; returns how many."""
    return patch_forward(model, lambda m: isinstance(m, nn.MultiheadAttention), _self_attention_forward)
