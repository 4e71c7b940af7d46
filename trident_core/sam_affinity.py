"""S6: SAM's image encoding, and the affinity A built from its last block, computed a block of rows at a time.

A small adapter runs segment_anything's encoder modules in their own order up to the last block's qkv projection
(q, k, v are all the affinity needs); the rest of the last block and the neck, whose output only the refinement's
mask decoder uses, run when the refinement asks for that embedding (`image_embedding`). An encoding never changes
once made (ComfyUI hands the same cached object to every later run). The attention probabilities W_h (softmax over all
64x64 tokens, padding included, relative position added) and the value cosines C_h are computed for a block of
valid rows at a time, so no [heads, N, N] tensor ever exists (aggregation.py multiplies each block into the
features)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import CORRELATIONS, check_mode
from .models import SamModel
from .onednn import linear
from .sam_attention import attention_probs


@dataclass(frozen=True, eq=False)
class SamEncoding:
    """One SAM encoding of an image (or tile): the last block's q, k, v [heads, 64*64, head_dim] (float32) and its
    input (to finish the encoder for the mask decoder: `image_embedding`)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    last_input: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    padded_grid: tuple[int, int]
    made_by: str = ""

    @property
    def grid(self) -> tuple[int, int]:
        """The valid token region (hs, ws): the resized image's size // 16."""
        return self.input_size[0] // 16, self.input_size[1] // 16


def unit_values(enc: SamEncoding) -> torch.Tensor:
    """The valid tokens' L2-normalised values [heads, N, head_dim], whose products are the cosines C_h."""
    return F.normalize(enc.v[:, _valid_index(enc)], dim=-1)


@torch.no_grad()
def image_embedding(enc: SamEncoding, sam: SamModel) -> torch.Tensor:
    """The encoder's output [1, 256, 64, 64] (float32) on SAM's device: the last block and the neck, finished from
    the encoding (a new tensor; the encoding is left as it is)."""
    encoder = sam.model.image_encoder
    x = encoder.blocks[-1](enc.last_input.to(device=sam.device, dtype=sam.dtype))
    return encoder.neck(x.permute(0, 3, 1, 2)).float()


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
    return SamEncoding(q, k, v, x, input_size, tuple(image.shape[:2]), (h, w), sam_identity(sam))


def sam_identity(sam: SamModel) -> str:
    """Which SAM made an encoding: its architecture and file (another SAM cannot decode or explain it)."""
    return f"{sam.arch} from {sam.path}"


def require_same_sam(enc: SamEncoding, sam: SamModel, what: str) -> None:
    """Refuse to use an encoding with another SAM than the one that made it (its tokens mean nothing to it)."""
    if enc.made_by != sam_identity(sam):
        raise ValueError(f"the {what} was made with SAM {enc.made_by}, but the SAM given here is "
                         f"{sam_identity(sam)}: connect the SAM that made it (the one given to Splice & Aggregate)")


def _valid_index(enc: SamEncoding) -> torch.Tensor:
    """Flat indices of the valid region's tokens in the padded grid, row-major."""
    hs, ws = enc.grid
    pw = enc.padded_grid[1]
    rows = torch.arange(hs, device=enc.q.device)[:, None] * pw
    return (rows + torch.arange(ws, device=enc.q.device)[None, :]).reshape(-1)


def _head_attention(enc: SamEncoding, sam: SamModel, rows: torch.Tensor):
    """A function of the head h giving the last block's attention probabilities [len(rows), 64*64] for the query
    tokens `rows` (softmax over all tokens, padding included, relative position added)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    attn_mod = sam.model.image_encoder.blocks[-1].attn
    grid = enc.padded_grid
    q = enc.q[:, rows]
    rel_h = rel_w = None
    if attn_mod.use_rel_pos:
        rh = get_rel_pos(grid[0], grid[0], attn_mod.rel_pos_h.float())  # [ph, ph, c]
        rw = get_rel_pos(grid[1], grid[1], attn_mod.rel_pos_w.float())
        rel_h = torch.einsum("hrc,rkc->hrk", q, rh[rows // grid[1]])  # [heads, r, ph]
        rel_w = torch.einsum("hrc,rkc->hrk", q, rw[rows % grid[1]])  # [heads, r, pw]
    return lambda h: attention_probs(q[h], enc.k[h], attn_mod.scale, grid, None if rel_h is None else rel_h[h],
                                     None if rel_w is None else rel_w[h])


def affinity_rows(enc: SamEncoding, sam: SamModel, start: int, stop: int, mode: str = "affinity",
                  cos_fac: float = 1.2, refine_neg_cos: bool = True,
                  unit_v: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start..stop of the row-normalised correlation matrix over the valid tokens, [stop-start, N].
    `unit_v` is `unit_values(enc)` when the caller computed it once for many blocks.

    Heads come one at a time, so a block of rows holds the heads' cosines and a few [rows, N] matrices; the
    reference's order of operations is kept (bit-identical thresholds)."""
    check_mode("correlation", mode, CORRELATIONS)
    valid = _valid_index(enc)
    everything = len(valid) == enc.q.shape[1]
    n, heads = len(valid), enc.q.shape[0]
    if mode == "none":
        a = torch.zeros(stop - start, n, device=enc.q.device)
    else:
        if mode in ("affinity", "cosine"):
            unit_v = unit_values(enc) if unit_v is None else unit_v
            cos = [linear(unit_v[h, start:stop], unit_v[h]) for h in range(heads)]  # C_h rows, [r, N] each
            mean_cos = cos[0].clone()
            for c in cos[1:]:  # summed in order then divided: the head mean bit for bit, without a stacked copy
                mean_cos.add_(c)
            mean_cos.div_(heads)
            tau = cos_fac * mean_cos.mean(dim=-1, keepdim=True)  # [r, 1]
            if not refine_neg_cos:
                tau = torch.where(tau < 0, torch.full_like(tau, 0.6), tau)
            tau = tau.clamp(max=0.9)
        if mode == "cosine":  # Eq. 4: softmax over the head-mean cosine, entries under the threshold excluded
            a = mean_cos.masked_fill(mean_cos <= tau, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        else:
            probs = _head_attention(enc, sam, valid[start:stop])
            a = torch.zeros(stop - start, n, device=enc.q.device)
            for h in range(heads):
                p = probs(h) if everything else probs(h)[:, valid]
                if mode == "affinity":
                    p.mul_(cos[h] > tau)
                a.add_(p)
            a.div_(heads)
    total = a.sum(dim=-1, keepdim=True)
    eye = torch.zeros_like(a)
    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    return torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), eye)
