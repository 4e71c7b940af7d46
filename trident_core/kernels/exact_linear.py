"""Float32 products on x86 CPUs through oneDNN, bit-identical to PyTorch's own (MKL) `F.linear`.

MKL sums the inner dimension K in blocks, each from zero, added in order onto the output (bias first); oneDNN sums
a short block from zero in the same order. So oneDNN products over MKL's blocks, added in order, give MKL's result
bit for bit. The blocks are found once per (N, K) by a probe that must reproduce `F.linear` exactly; where none
does (another BLAS, another CPU), PyTorch's kernel runs. Where one does, oneDNN still runs only where it was
measured faster than `F.linear` for that shape on this host (`timing.trial`: a shape's first calls run both ways
on their real inputs)."""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

from . import timing
from .patching import patch_forward
from .switch import enabled

ROWS = 256  # rows per chunk: the chunk's output stays in cache while its blocks are added
PROBE_ROWS = 64  # rows of the exactness probe, and the fewest rows `linear` sends to oneDNN
TIME_ROWS = 512  # row counts above this share one timing decision
_BLOCK_SIZES = (64, 96, 128, 192, 256, 384, 512)


@functools.cache
def available() -> bool:
    """Whether oneDNN's linear kernel exists here and the kernels are switched on."""
    if not enabled() or platform.machine().lower() not in ("x86_64", "amd64"):
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


def _timing_key(m: int, n: int, k: int) -> tuple[str, int, int]:
    """The decision's key, and the M and N of the calls it stands for: M rounded up to a power of two (at most
    TIME_ROWS: longer inputs run in chunks of ROWS anyway), N up to a multiple of 256 (SAM's token counts vary)."""
    m_key = min(TIME_ROWS, 1 << (m - 1).bit_length())
    n_key = -(-n // 256) * 256
    return f"onednn linear M={m_key} N={n_key} K={k}", m_key, n_key


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` bit for bit: x [..., K], w [N, K]. Through oneDNN for float32 CPU tensors where
    that reproduces it and was measured faster, through PyTorch otherwise."""
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
    if cuts is None:
        return F.linear(x, w, bias)

    def ours() -> torch.Tensor:
        return _blocked(x.reshape(m, k), w, bias, cuts).view(*x.shape[:-1], n)

    key, m_key, n_key = _timing_key(m, n, k)
    decision = timing.known(key)
    if decision is None:
        return timing.trial(key, ours, lambda: F.linear(x, w, bias))
    decision.work += m / m_key * n / n_key
    return ours() if decision.use_ours else F.linear(x, w, bias)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def use_exact_linear(model: nn.Module) -> int:
    """Route every nn.Linear of a model through `linear` (bit-identical); returns how many."""
    return patch_forward(model, lambda m: isinstance(m, nn.Linear), _linear_forward)
