"""A memory-lean forward for segment_anything's encoder attention, computed for a band of query rows at a time.

SAM ViT-B's global blocks would otherwise hold [heads, 4096, 4096] matrices (0.8 GB each in float32). Softmax is
per row, so the banded result is the full one. On the CPU each band repeats segment_anything's own operations in
the same order (bit-identical results); on a GPU the band goes through `scaled_dot_product_attention` with the
decomposed relative-position term as an additive bias (a fused kernel; equal up to rounding)."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def query_band(device: torch.device) -> int:
    """Query tokens per band: few on the CPU (memory), many on GPUs (each band costs kernel launches)."""
    return 256 if device.type == "cpu" else 1024


def banded_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's Attention.forward (x: [B, H, W, C]) in bands of query rows."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # [B*heads, N, c]
    rel_h = rel_w = None
    if self.use_rel_pos:
        rq = q.reshape(b * self.num_heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, get_rel_pos(h, h, self.rel_pos_h))  # [B*heads, H, W, H]
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, get_rel_pos(w, w, self.rel_pos_w))  # [B*heads, H, W, W]
    fused = q.device.type != "cpu"
    rows = max(1, query_band(q.device) // w)
    out = torch.empty_like(q)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        qs = q[:, r0 * w:r1 * w]
        if fused:
            bias = None
            if rel_h is not None:
                bias = (rel_h[:, r0:r1, :, :, None] + rel_w[:, r0:r1, :, None, :]).reshape(-1, (r1 - r0) * w, h * w)
            out[:, r0 * w:r1 * w] = F.scaled_dot_product_attention(qs[None], k[None], v[None],
                                                                   attn_mask=None if bias is None else bias[None])[0]
            continue
        attn = (qs * self.scale) @ k.transpose(-2, -1)
        if rel_h is not None:  # in place, in segment_anything's order: (qk + rel_h) + rel_w
            attn.view(-1, r1 - r0, w, h, w).add_(rel_h[:, r0:r1, :, :, None]).add_(rel_w[:, r0:r1, :, None, :])
        out[:, r0 * w:r1 * w] = torch.softmax(attn, dim=-1, out=attn) @ v
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def use_banded_attention(image_encoder: nn.Module) -> None:
    """Give every attention module of a SAM image encoder the banded forward (same results, less memory)."""
    for blk in image_encoder.blocks:
        blk.attn.forward = types.MethodType(banded_attention_forward, blk.attn)
