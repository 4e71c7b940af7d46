"""S6: the affinity A built from SAM's last encoder block, computed a block of rows at a time.

The attention probabilities W_h (softmax over all 64x64 tokens, padding included, relative position added; the SAM
adapter gives them) and the value cosines C_h are computed for a block of valid rows at a time, so no
[heads, N, N] tensor ever exists (aggregation.py multiplies each block into the features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import AggregateConfig
from .models import SamEncoding, SamModel


def unit_values(enc: SamEncoding) -> torch.Tensor:
    """The valid tokens' L2-normalised values [heads, N, head_dim], whose products are the cosines C_h."""
    return F.normalize(enc.v[:, _valid_index(enc)], dim=-1)


def _valid_index(enc: SamEncoding) -> torch.Tensor:
    """Flat indices of the valid region's tokens in the padded grid, row-major."""
    hs, ws = enc.grid
    pw = enc.padded_grid[1]
    rows = torch.arange(hs, device=enc.q.device)[:, None] * pw
    return (rows + torch.arange(ws, device=enc.q.device)[None, :]).reshape(-1)


def heads_at_once(device: torch.device) -> bool:
    """Whether a block of rows takes all heads in batched products: on GPUs, where each head's dozen small kernels
    cost more in launches than they compute; on the CPU one head at a time keeps the reference's values bit for
    bit and the memory to a few [rows, N] matrices."""
    return device.type != "cpu"


def affinity_rows(enc: SamEncoding, sam: SamModel, start: int, stop: int, config: AggregateConfig,
                  unit_v: torch.Tensor | None = None, batched: bool | None = None) -> torch.Tensor:
    """Rows start..stop of the row-normalised correlation matrix over the valid tokens, [stop-start, N], by
    `config`'s correlation mode, cos_fac and refine_neg_cos. `unit_v` is `unit_values(enc)` when the caller
    computed it once for many blocks; `batched`: all heads at once (default: `heads_at_once`).

    One head at a time, a block of rows holds the heads' cosines and a few [rows, N] matrices; the
    reference's order of operations is kept (bit-identical thresholds)."""
    mode = config.correlation
    if mode != "none" and (heads_at_once(enc.q.device) if batched is None else batched):
        return _normalised(_batched_rows(enc, sam, start, stop, config, unit_v), start, stop)
    valid = _valid_index(enc)
    everything = len(valid) == enc.q.shape[1]
    n, heads = len(valid), enc.q.shape[0]
    if mode == "none":
        a = torch.zeros(stop - start, n, device=enc.q.device)
    else:
        if mode in ("affinity", "cosine"):
            unit_v = unit_values(enc) if unit_v is None else unit_v
            cos = sam.value_cosines(unit_v, start, stop)  # C_h rows, [r, N] each
            mean_cos = cos[0].clone()
            for c in cos[1:]:  # summed in order then divided: the head mean bit for bit, without a stacked copy
                mean_cos.add_(c)
            mean_cos.div_(heads)
            tau = _threshold(mean_cos, config)  # [r, 1]
        if mode == "cosine":  # Eq. 4: softmax over the head-mean cosine, entries under the threshold excluded
            a = mean_cos.masked_fill(mean_cos <= tau, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        else:
            probs = sam.head_attention(enc, valid[start:stop])
            a = torch.zeros(stop - start, n, device=enc.q.device)
            for h in range(heads):
                p = probs(h) if everything else probs(h)[:, valid]
                if mode == "affinity":  # (the mask as 1.0 / 0.0 in the cosines' own memory: a bool mask
                    p.mul_(torch.gt(cos[h], tau, out=cos[h]))  # took a 10x slower mixed-type product)
                a.add_(p)
            a.div_(heads)
    return _normalised(a, start, stop)


def _threshold(mean_cos: torch.Tensor, config: AggregateConfig) -> torch.Tensor:
    """The rows' cosine thresholds tau [r, 1] from the head-mean cosines [r, N]."""
    tau = config.cos_fac * mean_cos.mean(dim=-1, keepdim=True)
    if not config.refine_neg_cos:
        tau = torch.where(tau < 0, torch.full_like(tau, 0.6), tau)
    return tau.clamp(max=0.9)


def _batched_rows(enc: SamEncoding, sam: SamModel, start: int, stop: int, config: AggregateConfig,
                  unit_v: torch.Tensor | None) -> torch.Tensor:
    """`affinity_rows` before its row normalisation, every head in one batched product per step ([heads, r, N]
    tensors): the same formula, rounded as batched products and a mean over heads round."""
    valid = _valid_index(enc)
    if config.correlation in ("affinity", "cosine"):  # (attention alone reads no cosines)
        unit_v = unit_values(enc) if unit_v is None else unit_v
        cos = torch.bmm(unit_v[:, start:stop], unit_v.transpose(1, 2))  # [heads, r, N]
        mean_cos = cos.mean(dim=0)
        tau = _threshold(mean_cos, config)
    if config.correlation == "cosine":  # Eq. 4
        return mean_cos.masked_fill(mean_cos <= tau, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    probs = sam.all_heads_attention(enc, valid[start:stop])  # [heads, r, padded N]
    if len(valid) != probs.shape[-1]:
        probs = probs[:, :, valid]
    if config.correlation == "affinity":
        probs.mul_(torch.gt(cos, tau, out=cos))
    return probs.mean(dim=0)


def _normalised(a: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows of `a` divided by their sums; a row summing to 0 becomes its token's own row of the identity."""
    total = a.sum(dim=-1, keepdim=True)
    eye = torch.zeros_like(a)
    eye.diagonal(offset=start).fill_(1.0)  # (an indexed assignment waited for a GPU's queue: 8 times a frame)
    return torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), eye)
