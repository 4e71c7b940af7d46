"""S6: SAM's image encoding, and the affinity A built from its last block, computed a block of rows at a time.

A small adapter runs segment_anything's encoder modules in their own order up to the last block's qkv projection
(q, k, v are all the affinity needs); the rest of the last block and the neck, whose output only the refinement's
mask decoder uses, run when that embedding is first asked for. The attention probabilities W_h (softmax over all
64x64 tokens, padding included, relative position added) and the value cosines C_h are computed for a block of
valid rows at a time, so no [heads, N, N] tensor ever exists (aggregation.py multiplies each block into the
features)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .models import SamModel

CORRELATIONS = ("affinity", "attention", "cosine", "none")


@dataclass(eq=False)
class SamEncoding:
    """One SAM encoding of an image (or tile): the last block's q, k, v [heads, 64*64, head_dim] (float32), its
    input (to finish the encoder later) and, once computed, the image embedding for the mask decoder."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    last_input: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    padded_grid: tuple[int, int]
    features: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """The valid token region (hs, ws): the resized image's size // 16."""
        return self.input_size[0] // 16, self.input_size[1] // 16

    @torch.no_grad()
    def image_embedding(self, sam: SamModel) -> torch.Tensor:
        """The encoder's output [1, 256, 64, 64] (float32): the last block and the neck, run once on demand."""
        if self.features is None:
            enc = sam.model.image_encoder
            x = enc.blocks[-1](self.last_input.to(device=sam.device, dtype=sam.dtype))
            self.features = enc.neck(x.permute(0, 3, 1, 2)).float()
        return self.features


@torch.no_grad()
def encode_sam(sam: SamModel, image: np.ndarray) -> SamEncoding:
    """SAM's ResizeLongestSide, pixel normalisation, padding and image encoder on an RGB uint8 image."""
    from segment_anything.utils.transforms import ResizeLongestSide

    model = sam.model
    enc = model.image_encoder
    resized = ResizeLongestSide(enc.img_size).apply_image(image)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None]
    input_size = tuple(x.shape[-2:])
    x = model.preprocess(x.float()).to(sam.dtype)
    x = enc.patch_embed(x)  # ImageEncoderViT.forward, stopped at the last block's qkv projection
    if enc.pos_embed is not None:
        x = x + enc.pos_embed
    for blk in enc.blocks[:-1]:
        x = blk(x)
    last = enc.blocks[-1]
    qkv = last.attn.qkv(last.norm1(x))
    b, h, w, _ = qkv.shape
    heads = last.attn.num_heads
    q, k, v = qkv.float().reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * heads, h * w, -1)
    return SamEncoding(q, k, v, x, input_size, tuple(image.shape[:2]), (h, w))


def _valid_index(enc: SamEncoding) -> torch.Tensor:
    """Flat indices of the valid region's tokens in the padded grid, row-major."""
    hs, ws = enc.grid
    pw = enc.padded_grid[1]
    rows = torch.arange(hs, device=enc.q.device)[:, None] * pw
    return (rows + torch.arange(ws, device=enc.q.device)[None, :]).reshape(-1)


def _attention_rows(enc: SamEncoding, sam: SamModel, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities [heads, len(rows), len(cols)] of the last block (softmax over all tokens)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    attn_mod = sam.model.image_encoder.blocks[-1].attn
    ph, pw = enc.padded_grid
    q = enc.q[:, rows]
    logits = (q * attn_mod.scale) @ enc.k.transpose(1, 2)
    if attn_mod.use_rel_pos:
        rh = get_rel_pos(ph, ph, attn_mod.rel_pos_h.float())  # [ph, ph, c]
        rw = get_rel_pos(pw, pw, attn_mod.rel_pos_w.float())
        qy, qx = rows // pw, rows % pw
        rel_h = torch.einsum("hrc,rkc->hrk", q, rh[qy])  # [heads, r, ph]
        rel_w = torch.einsum("hrc,rkc->hrk", q, rw[qx])  # [heads, r, pw]
        logits.view(q.shape[0], q.shape[1], ph, pw).add_(rel_h[..., :, None]).add_(rel_w[..., None, :])
    return torch.softmax(logits, dim=-1, out=logits)[:, :, cols]


def affinity_rows(enc: SamEncoding, sam: SamModel, start: int, stop: int, mode: str = "affinity",
                  cos_fac: float = 1.2, refine_neg_cos: bool = True) -> torch.Tensor:
    """Rows start..stop of the row-normalised correlation matrix over the valid tokens, [stop-start, N]."""
    valid = _valid_index(enc)
    rows = valid[start:stop]
    if mode == "attention":
        a = _attention_rows(enc, sam, rows, valid).mean(dim=0)
    elif mode in ("affinity", "cosine"):
        vh = F.normalize(enc.v[:, valid], dim=-1)
        cos = vh[:, start:stop] @ vh.transpose(1, 2)  # C_h rows, [heads, r, N]
        tau = cos_fac * cos.mean(dim=0).mean(dim=-1, keepdim=True)  # [r, 1]
        if not refine_neg_cos:
            tau = torch.where(tau < 0, torch.full_like(tau, 0.6), tau)
        tau = tau.clamp(max=0.9)
        if mode == "affinity":
            a = torch.where(cos > tau, _attention_rows(enc, sam, rows, valid), torch.zeros(())).mean(dim=0)
        else:  # Eq. 4: softmax over the head-mean cosine, entries under the threshold excluded
            mean_cos = cos.mean(dim=0)
            a = mean_cos.masked_fill(mean_cos <= tau, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    elif mode == "none":
        a = torch.zeros(len(rows), len(valid), device=enc.q.device)
        a[torch.arange(len(rows)), torch.arange(start, stop)] = 1.0
    else:
        raise ValueError(f"correlation mode must be one of {CORRELATIONS}, not {mode!r}")
    total = a.sum(dim=-1, keepdim=True)
    eye = torch.zeros_like(a)
    eye[torch.arange(len(rows)), torch.arange(start, stop)] = 1.0
    return torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), eye)
