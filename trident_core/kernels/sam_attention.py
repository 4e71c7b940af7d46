"""A memory-lean forward for segment_anything's encoder attention, computed for a band of query rows at a time.

SAM ViT-B's global blocks would otherwise hold [heads, 4096, 4096] matrices (0.8 GB each in float32). Softmax is
per row, so the banded result is the full one. On the CPU each band repeats segment_anything's operations in its
order on all heads at once (the same batched products: BLAS runs a batch's products the same way for any band of
rows, while a single head's product may be split across threads differently, so it is bit-identical). On a GPU,
the band goes through `scaled_dot_product_attention` with the decomposed relative-position term as an additive bias
(a fused kernel; equal up to rounding), and in half precision the whole grid through one call with the terms as
extra channels (`augmented`, below). In bfloat16 on the CPU (where the float32 bands' strided products copy their
operands, several times slower) the whole grid goes through one `scaled_dot_product_attention` without a mask,
where timed faster on the whole grid (`timing`): the relative-position terms ride in extra channels (`augmented`),
so no bias tensor is built and the kernel takes its fast path (a global block of SAM ViT-B at 1024x1024: 0.12 s
against 0.26 s for biased bands and 0.6 s for segment_anything's operations in bands)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import timing
from .exact_linear import linear
from .patching import patch_forward


def query_band(device: torch.device, heads: int, keys: int, element_size: int = 4) -> int:
    """Query tokens per band: on the CPU as many as keep a band's [heads, rows, keys] scores near 16 MB (memory,
    cache); on GPUs 1024 (each band costs kernel launches), fewer where the scores would pass 256 MB (several
    frames' heads in one forward: `Trident.segment_frames`), at least 64."""
    if device.type != "cpu":
        return min(1024, max(64, (256 << 20) // (element_size * heads * keys)))
    return max(1, (16 << 20) // (element_size * heads * keys))


def channel_heads(device: torch.device, keys: int, width: int, element_size: int) -> int | None:
    """Heads per `augmented` call: on the CPU as many as keep each widened [heads, keys, width] copy near 4 MB
    (SAM ViT's global blocks in bfloat16: 2 of 12, the four copies 18 instead of 76 MB); None elsewhere (a GPU
    takes every head in one call, each call costing launches)."""
    return max(1, (4 << 20) // (keys * width * element_size)) if device.type == "cpu" else None


def rel_pos_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """segment_anything's get_rel_pos with its index made on rel_pos's device (made on the CPU, it was a blocking
    copy to a GPU at every call: each block of every forward)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    with rel_pos.device:
        return get_rel_pos(q_size, k_size, rel_pos)


def whole_grid_channels(device: torch.device, dtype: torch.dtype) -> bool:
    """On a CUDA GPU in half precision, the whole grid goes through one `augmented` call: the fused kernel takes
    the relative-position terms as extra channels, so no [heads, rows, N] bias is written and read per band (a
    frame's global blocks at 448x448 spent twice the attention's time building the bias). Elsewhere (MPS) the
    bands keep each call's scores bounded, whichever kernel runs them."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, grid: tuple[int, int],
                    rel_h: torch.Tensor | None = None, rel_w: torch.Tensor | None = None) -> torch.Tensor:
    """One head's softmax((q scale) kᵀ + rel_h + rel_w), [r, N], for queries q [r, c] over keys k [N, c] on a
    grid (gh, gw) = N, with the decomposed relative-position terms rel_h [r, gh] and rel_w [r, gw] (as
    segment_anything's add_decomposed_rel_pos adds them, in its order)."""
    logits = linear(q * scale, k)
    if rel_h is not None:
        logits.view(-1, *grid).add_(rel_h[:, :, None]).add_(rel_w[:, None, :])
    return torch.softmax(logits, dim=-1, out=logits)


def augmented(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, grid: tuple[int, int],
              rel_h: torch.Tensor | None, rel_w: torch.Tensor | None, per_call: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ scale + rel_h + rel_w) v, [B, r, c], for queries q [B, r, c] over keys k, v [B, N, c] on a grid
    (gh, gw) = N, in `scaled_dot_product_attention` without a mask: each query carries its terms rel_h [B, r, gh]
    and rel_w [B, r, gw] as extra channels, each key a one-hot of its grid row and column (scaled keys: the kernel's
    scale is 1), and v is padded to the same width (the kernel's fast path wants equal widths). `per_call`: at most
    that many of the B heads per call (each head's result is its own: the widened copies then exist for those
    heads only, not all)."""
    if rel_h is None:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)[0]
    gh, gw = grid
    b, n, c = k.shape
    token = torch.arange(n, device=k.device)
    onehot = torch.cat([F.one_hot(token // gw, gh), F.one_hot(token % gw, gw)], dim=-1).to(k.dtype)
    step = per_call or b
    out = q.new_empty(q.shape) if step < b else None
    for s in range(0, b, step):
        e = min(b, s + step)
        keys = torch.cat([k[s:e] * scale, onehot.expand(e - s, -1, -1)], dim=-1)
        queries = torch.cat([q[s:e], rel_h[s:e].to(q.dtype), rel_w[s:e].to(q.dtype)], dim=-1)
        values = F.pad(v[s:e], (0, gh + gw))
        part = F.scaled_dot_product_attention(queries[None], keys[None], values[None], scale=1.0)[0, ..., :c]
        if out is None:
            return part
        out[s:e] = part
    return out


def banded_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's Attention.forward (x: [B, H, W, C]) in bands of query rows."""
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # [B*heads, N, c]
    rel_h = rel_w = None
    if self.use_rel_pos:
        rq = q.reshape(b * self.num_heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rel_pos_table(h, h, self.rel_pos_h))  # [B*heads, H, W, H]
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rel_pos_table(w, w, self.rel_pos_w))  # [B*heads, H, W, W]
    rows = max(1, query_band(q.device, q.shape[0], h * w, q.element_size()) // w)  # whole grid rows per band
    kt = k.transpose(-2, -1)
    if q.device.type == "cpu" and q.dtype != torch.float32:  # k and v are strided views of qkv, which each band's
        kt, v = kt.contiguous(), v.contiguous()  # product copied again (bf16 1024x1024: 0.3 s of the encoder's 2.1 s)

    def exact(r0: int, r1: int) -> torch.Tensor:
        attn = (q[:, r0 * w:r1 * w] * self.scale) @ kt  # segment_anything's operations, in its order
        if rel_h is not None:
            attn.view(-1, r1 - r0, w, h, w).add_(rel_h[:, r0:r1, :, :, None]).add_(rel_w[:, r0:r1, :, None, :])
        return torch.softmax(attn, dim=-1, out=attn) @ v

    def fused(r0: int, r1: int) -> torch.Tensor:
        bias = None
        if rel_h is not None:
            bias = (rel_h[:, r0:r1, :, :, None] + rel_w[:, r0:r1, :, None, :]).reshape(-1, (r1 - r0) * w, h * w)
        return F.scaled_dot_product_attention(q[None, :, r0 * w:r1 * w], k[None], v[None],
                                              attn_mask=None if bias is None else bias[None])[0]

    def channels(r0: int, r1: int) -> torch.Tensor:
        return augmented(q[:, r0 * w:r1 * w], k, v, self.scale, (h, w),
                         None if rel_h is None else rel_h[:, r0:r1].reshape(-1, (r1 - r0) * w, h),
                         None if rel_w is None else rel_w[:, r0:r1].reshape(-1, (r1 - r0) * w, w),
                         channel_heads(q.device, h * w, q.shape[-1] + h + w, q.element_size()))

    def grid(band: Callable[[int, int], torch.Tensor], step: int) -> torch.Tensor:
        """The whole grid's output [B*heads, N, c], `step` grid rows per call of `band`."""
        out = torch.empty_like(q)
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            out[:, r0 * w:r1 * w] = band(r0, r1)
        return out

    band = exact if q.device.type == "cpu" else fused
    if whole_grid_channels(q.device, q.dtype):
        band, rows = channels, h
    if q.device.type == "cpu" and q.dtype != torch.float32:  # one call without a mask where measured faster
        key = (f"sam attention {str(q.dtype).removeprefix('torch.')} channels, whole grid B*heads={q.shape[0]} "
               f"grid={h}x{w} c={q.shape[-1]} rows={rows}")  # (each contender timed on the whole grid, as it runs)
        decision = timing.decide(key, lambda: (lambda: grid(channels, h), lambda: grid(exact, rows)))
        decision.work += 1
        if decision.use_ours:
            band, rows = channels, h  # (no [heads, rows, N] bias: the whole grid at once)
    out = grid(band, rows)
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def use_banded_attention(model: nn.Module) -> int:
    """Give every attention module of a SAM image encoder the banded forward (same results, less memory);
    returns how many."""
    from segment_anything.modeling.image_encoder import Attention

    return patch_forward(model, lambda m: isinstance(m, Attention), banded_attention_forward)
