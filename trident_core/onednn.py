"""Float32 linear layers on x86 CPUs through oneDNN, bit-identical to PyTorch's own (MKL) results, and faster.

PyTorch computes float32 `linear` on the CPU with MKL, whose kernels run well under the machine's peak on some
CPUs (on AMD EPYC, at about half of it) while oneDNN's JIT kernels reach it. MKL sums the inner dimension K in
blocks, each from zero, added in order onto the output (bias first); oneDNN sums a short block from zero in the
same order. So oneDNN products over MKL's blocks, added in order, give MKL's result bit for bit. The blocks are
found once per (N, K) by a probe that must reproduce `F.linear` exactly; where none does (another BLAS, another
CPU) or where it would not be faster, PyTorch's kernel runs. Exactness matters here: DINO's proxy attention and
SAM's affinity threshold their inputs, so a last-bit difference can flip an entry (measured: up to 2.6e-4 on
the logits), and the reference's numbers are the target. `TRIDENT_ONEDNN=0` turns this off."""

from __future__ import annotations

import functools
import os
import platform
import types

import torch
import torch.nn.functional as F
from torch import nn

ENV = "TRIDENT_ONEDNN"
ROWS = 256  # rows per chunk: the chunk's output stays in cache while its blocks are added
PROBE_ROWS = 64  # rows of the probe, and the fewest rows `linear` sends to oneDNN
_BLOCK_SIZES = (64, 96, 128, 192, 256, 384, 512)
_MIN_WORK = 1 << 24  # M*N*K under which several blocks are not worth the calls


@functools.cache
def available() -> bool:
    """Whether oneDNN's linear kernel exists here and is wanted."""
    if os.environ.get(ENV, "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] (row stride free) @ w [N, K]ᵀ (dense: a strided weight falls to oneDNN's slow reference kernel)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")


def _blocked(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
             cuts: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Σ over K-blocks of oneDNN products, in order, bias first; a [M, K], w [N, K] -> [M, N]."""
    if len(cuts) == 1:
        return _onednn(a, w.contiguous(), bias)
    wb = [w[:, s:e].contiguous() for s, e in cuts]
    out = a.new_empty(a.shape[0], w.shape[0])
    for r in range(0, a.shape[0], ROWS):
        ar = a[r:r + ROWS]
        acc = _onednn(ar[:, cuts[0][0]:cuts[0][1]], wb[0], bias)
        for (s, e), wj in zip(cuts[1:], wb[1:]):
            acc.add_(_onednn(ar[:, s:e], wj))
        out[r:r + ROWS] = acc
    return out


def _candidates(k: int) -> list[tuple[tuple[int, int], ...]]:
    """Ways a BLAS may cut K: whole, in halves, or in fixed blocks with the remainder last."""
    out = [((0, k),), ((0, (k + 1) // 2), ((k + 1) // 2, k)), ((0, k // 2), (k // 2, k))]
    out += [tuple((s, min(k, s + b)) for s in range(0, k, b)) for b in _BLOCK_SIZES if b < k]
    return list(dict.fromkeys(out))


@functools.cache
def mkl_blocks(n: int, k: int) -> tuple[tuple[int, int], ...] | None:
    """The K-blocks over which oneDNN reproduces PyTorch's float32 [M, K] x [n, K]ᵀ (+ bias) bit for bit here,
    or None. Random operands: a wrong guess differs in almost every entry."""
    if not available():
        return None
    return _probe(n, k)


@torch.no_grad()
def _probe(n: int, k: int) -> tuple[tuple[int, int], ...] | None:
    g = torch.Generator().manual_seed(k)
    a, w, bias = torch.randn(PROBE_ROWS, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    want, want_nobias = F.linear(a, w, bias), F.linear(a, w)
    for cuts in _candidates(k):
        try:
            if torch.equal(_blocked(a, w, bias, cuts), want) and torch.equal(_blocked(a, w, None, cuts), want_nobias):
                return cuts
        except RuntimeError:
            return None
    return None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` bit for bit: x [..., K], w [N, K]. Through oneDNN for float32 CPU tensors where
    that reproduces it and is faster, through PyTorch otherwise."""
    if not (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and w.dim() == 2 and x.dim() >= 2
            and (bias is None or bias.dtype == torch.float32) and not torch.jit.is_tracing()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return F.linear(x, w, bias)
    n, k = w.shape
    m = x.numel() // max(k, 1)
    # PyTorch itself rounds differently for few rows (another MKL kernel) and for strided N-d inputs (a batched
    # product): those stay with it.
    if m < PROBE_ROWS or (x.dim() > 2 and not x.is_contiguous()):
        return F.linear(x, w, bias)
    cuts = mkl_blocks(n, k)
    if cuts is None or (len(cuts) > 1 and (n < 256 or m * n * k < _MIN_WORK)):
        return F.linear(x, w, bias)
    return _blocked(x.reshape(m, k), w, bias, cuts).view(*x.shape[:-1], n)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def _self_attention_forward(self: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                            need_weights: bool = True, attn_mask: torch.Tensor | None = None,
                            average_attn_weights: bool = True, is_causal: bool = False):
    """nn.MultiheadAttention.forward; batch-first self-attention on the CPU (what CLIP's towers call) as the
    in-projection through `linear`, `scaled_dot_product_attention`, the out-projection through `linear`.

    PyTorch's own paths are slow there: its fast path multiplies q and k with MKL's batched kernel (a quarter of
    the CPU's speed) and its general path runs the in-projection of a transposed input as a batched product
    with a broadcast weight. Equal up to float rounding (CLIP's outputs meet no threshold)."""
    simple = (query is key and key is value and query.dim() == 3 and query.device.type == "cpu"
              and self.batch_first and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
              and key_padding_mask is None and not need_weights and not is_causal and not self.training
              and (attn_mask is None or attn_mask.dim() == 2))
    if not simple:
        return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)
    b, n, d = query.shape
    heads = self.num_heads
    qkv = linear(query, self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # MultiheadAttention's True means "masked out"
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_mask is None else attn_mask.to(q.dtype))
    return linear(o.transpose(1, 2).reshape(b, n, d), self.out_proj.weight, self.out_proj.bias), None


def use_onednn(model: nn.Module, attention: bool = False) -> None:
    """Route a model's linear layers through `linear` (bit-identical), and with `attention` its
    nn.MultiheadAttention self-attention through the faster forward above (equal up to rounding)."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.forward = types.MethodType(_linear_forward, mod)
        elif attention and isinstance(mod, nn.MultiheadAttention):
            mod.forward = types.MethodType(_self_attention_forward, mod)
