"""Segment Anything through segment_anything: the one module that knows its encoder, prompt encoder, mask decoder
and transforms.

Trident needs of SAM: the encoder run up to the last block's qkv projection (q, k, v are all the affinity needs),
that block's attention probabilities and value cosines for a band of query tokens, the rest of the encoder when
the refinement asks for the image embedding, and the mask decoder on point + box + mask prompts."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoints import SAM_HQ_EXTRAS, CheckpointError, complete, expect_family, read_state_dict
from ..image import ImageError, image_digest
from ..kernels import attention_probs, linear, rel_pos_table
from ..pil_resize import agrees_with_pil, pil_bilinear_resize
from .conversion import FLOAT32, LOW, converted
from .loading import (
    check_materialised,
    count_blocks,
    finite,
    load_strict,
    model_identity,
    on_meta,
    place,
    refuse_non_finite,
)
from .precision import linear32, norm32

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
PATCH = 16  # SAM's encoder patch: a token per 16x16 pixels of its input
MASK_PROMPT_SIDE = 256  # the mask decoder's low-resolution side
GPU_RESIZE_PIXELS = 4096 * 4096  # larger images are resized by PIL on the host (float64 copies of 400 MB and more)
_ARCHS = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}


@dataclass(frozen=True, eq=False)
class SamEncoding:
    """One SAM encoding of an image (or tile): the last block's q, k, v [heads, 64*64, head_dim] (float32) and its
    input (to finish the encoder for the mask decoder: `SamModel.image_embedding`). Never changed once made."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    last_input: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    padded_grid: tuple[int, int]
    made_by: str = ""
    image_digest: str = ""  # of the array encoded (`image.image_digest`)

    @property
    def grid(self) -> tuple[int, int]:
        """The valid token region (hs, ws): the resized image's size // 16."""
        return self.input_size[0] // PATCH, self.input_size[1] // PATCH

    def for_refinement(self) -> SamEncoding:
        """The encoding without the last block's q, k, v (the aggregation's: 36 MB at 64x64), which the refinement
        never reads: holding this one, the rest is freed before the classification."""
        empty = self.q.new_empty(0)
        return dataclasses.replace(self, q=empty, k=empty, v=empty)

    def to(self, device: torch.device | str) -> SamEncoding:
        """The encoding with its tensors on `device` (itself when they are there)."""
        if self.q.device == torch.device(device):
            return self
        return dataclasses.replace(self, q=self.q.to(device), k=self.k.to(device), v=self.v.to(device),
                                   last_input=self.last_input.to(device))


@dataclass(eq=False)
class SamModel:
    """A segment_anything Sam model."""

    model: nn.Module
    arch: str
    path: str
    rel_tables: dict = dataclasses.field(default_factory=dict, repr=False)  # see _rel_tables
    resize_matrices: dict = dataclasses.field(default_factory=dict, repr=False)  # pil_resize's cache

    @property
    def device(self) -> torch.device:
        return self.model.image_encoder.patch_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_encoder.patch_embed.proj.weight.dtype

    @property
    def num_heads(self) -> int:
        return self.model.image_encoder.blocks[-1].attn.num_heads

    @property
    def identity(self) -> str:
        """Which SAM made an encoding: its architecture and file, links resolved (another SAM cannot decode or
        explain it)."""
        return model_identity(self.arch, self.path)

    def check_encoding(self, enc: SamEncoding, what: str) -> None:
        """Refuse an encoding made by another SAM (its tokens mean nothing to this one)."""
        if enc.made_by != self.identity:
            raise ValueError(f"the {what} was made with SAM {enc.made_by}, but the SAM given here is "
                             f"{self.identity}: connect the SAM that made it (the one given to Splice & Aggregate)")

    # ---------------------------------------------------------------------------------------------- encoder

    def encode(self, image: np.ndarray) -> SamEncoding:
        """SAM's ResizeLongestSide, pixel normalisation, padding and image encoder on an RGB uint8 image, stopped
        at the last block's qkv projection."""
        return self.encode_many([image])[0]

    @torch.no_grad()
    def encode_many(self, images: Sequence[np.ndarray], digests: Sequence[str] | None = None,
                    after_block: Callable[[nn.Module], object] | None = None) -> list[SamEncoding]:
        """`encode` of several images in one forward of the encoder (its input is always img_size square: any
        sizes mix); each encoding owns its tensors. One image computes what `encode` always did. `digests`: the
        images' `image_digest`s where the caller has them; `after_block` gets each block but the last once it
        has run (e.g. `residency.release`: its weights' pages given back during the forward)."""
        model = self.model
        enc = model.image_encoder
        inputs = [self._input(image) for image in images]
        x = torch.cat([t for t, _ in inputs]) if len(inputs) > 1 else inputs[0][0]
        # ImageEncoderViT.forward, stopped at the last block's qkv projection; the patch embedding is a permuted
        # view, made contiguous here (the same values): otherwise every residual add and norm of the blocks
        # runs on strided memory (bfloat16 1024x1024: 0.35 s of the encoder's 1.6 s)
        x = enc.patch_embed(x).contiguous()
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks[:-1]:
            x = blk(x)
            if after_block is not None:
                after_block(blk)
        last = enc.blocks[-1]
        qkv = finite(linear32(norm32(last.norm1, x), last.attn.qkv.weight, last.attn.qkv.bias), "SAM",
                     self.path)  # what the affinity reads
        b, h, w, _ = qkv.shape
        heads = last.attn.num_heads
        q, k, v = qkv.reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * heads, h * w, -1)
        if b == 1:  # (each its own dense tensor: the affinity multiplies every head's k and v rows many times)
            return [SamEncoding(q.contiguous(), k.contiguous(), v.contiguous(), x, inputs[0][1],
                                tuple(images[0].shape[:2]), (h, w), self.identity,
                                digests[0] if digests else image_digest(images[0]))]
        return [SamEncoding(q[i * heads:(i + 1) * heads].clone(), k[i * heads:(i + 1) * heads].clone(),
                            v[i * heads:(i + 1) * heads].clone(), x[i:i + 1].clone(), size,
                            tuple(image.shape[:2]), (h, w), self.identity,
                            digests[i] if digests else image_digest(image))
                for i, (image, (_, size)) in enumerate(zip(images, inputs))]

    def _input(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """The encoder's input [1, 3, img_size, img_size] in SAM's dtype (resized longest side, normalised,
        padded) and the resized image's size."""
        from segment_anything.utils.transforms import ResizeLongestSide

        size = self.model.image_encoder.img_size
        h, w = image.shape[:2]
        if min(ResizeLongestSide.get_preprocess_shape(h, w, size)) < PATCH:
            raise ImageError(f"the image is too elongated for SAM: its {w}x{h} input is under {PATCH} pixels wide "
                             f"once scaled to {size} long; crop it to at most about 1:{size // PATCH}")
        target = ResizeLongestSide.get_preprocess_shape(h, w, size)
        if (self.device.type == "cuda" and h * w <= GPU_RESIZE_PIXELS
                and agrees_with_pil((h, w), target, self.device, self.resize_matrices)):  # (PIL's pixels, on the GPU)
            x = pil_bilinear_resize(torch.as_tensor(image, device=self.device), target, self.resize_matrices)
        else:
            x = torch.as_tensor(ResizeLongestSide(size).apply_image(image), device=self.device)
        x = x.permute(2, 0, 1).contiguous()[None]
        return self.model.preprocess(x.float()).to(self.dtype), tuple(x.shape[-2:])

    @torch.no_grad()
    def image_embedding(self, enc: SamEncoding) -> torch.Tensor:
        """The encoder's output [1, 256, 64, 64] (float32) on SAM's device: the last block and the neck, finished
        from the encoding (a new tensor; the encoding is left as it is)."""
        encoder = self.model.image_encoder
        x = encoder.blocks[-1](enc.last_input.to(device=self.device, dtype=self.dtype))
        return encoder.neck(x.permute(0, 3, 1, 2).contiguous()).float()  # (NCHW, as ImageEncoderViT has it)

    def _queries(self, enc: SamEncoding, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       torch.Tensor | None]:
        """The last block's queries of the tokens `rows` [heads, r, c] and their decomposed relative-position terms
        rel_h [heads, r, ph] and rel_w [heads, r, pw] (None without relative positions)."""
        q = enc.q[:, rows]
        if not self.model.image_encoder.blocks[-1].attn.use_rel_pos:
            return q, None, None
        rh, rw = self._rel_tables(enc.padded_grid)
        return (q, torch.einsum("hrc,rkc->hrk", q, rh[rows // enc.padded_grid[1]]),
                torch.einsum("hrc,rkc->hrk", q, rw[rows % enc.padded_grid[1]]))

    def _rel_tables(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's relative-position tables for a padded grid, [ph, ph, c] and [pw, pw, c] in float32,
        made once per grid where the weights are (every block of an encoding's affinity rows reads them, and
        remade them in about 20 small kernels each time). Only the weights' current device is kept."""
        attn_mod = self.model.image_encoder.blocks[-1].attn
        key = (tuple(grid), attn_mod.rel_pos_h.device)
        if key not in self.rel_tables:
            if any(k[1] != key[1] for k in self.rel_tables):  # (the weights moved: nothing kept on the old device)
                self.rel_tables.clear()
            self.rel_tables[key] = (rel_pos_table(grid[0], grid[0], attn_mod.rel_pos_h.float()),
                                    rel_pos_table(grid[1], grid[1], attn_mod.rel_pos_w.float()))
        return self.rel_tables[key]

    def head_attention(self, enc: SamEncoding, rows: torch.Tensor) -> Callable[[int], torch.Tensor]:
        """A function of the head h giving the last block's attention probabilities [len(rows), 64*64] for the
        query tokens `rows` (softmax over all tokens, padding included, relative position added)."""
        scale = self.model.image_encoder.blocks[-1].attn.scale
        q, rel_h, rel_w = self._queries(enc, rows)
        return lambda h: attention_probs(q[h], enc.k[h], scale, enc.padded_grid, None if rel_h is None else rel_h[h],
                                         None if rel_w is None else rel_w[h])

    def all_heads_attention(self, enc: SamEncoding, rows: torch.Tensor) -> torch.Tensor:
        """`head_attention` of every head at once, [heads, len(rows), 64*64], in batched products."""
        q, rel_h, rel_w = self._queries(enc, rows)
        logits = torch.bmm(q * self.model.image_encoder.blocks[-1].attn.scale, enc.k.transpose(1, 2))
        if rel_h is not None:
            logits.view(*logits.shape[:2], *enc.padded_grid).add_(rel_h[..., None]).add_(rel_w[:, :, None, :])
        return torch.softmax(logits, dim=-1, out=logits)

    @staticmethod
    def value_cosines(unit_v: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
        """Each head's cosines [stop-start, N] of the query tokens start..stop with all tokens, from the last
        block's L2-normalised values unit_v [heads, N, head_dim]."""
        return [linear(unit_v[h, start:stop], unit_v[h]) for h in range(unit_v.shape[0])]

    # ----------------------------------------------------------------------------------------- mask decoder

    @property
    def mask_threshold(self) -> float:
        return self.model.mask_threshold

    @staticmethod
    def mask_prompt_size(image_size: tuple[int, int]) -> tuple[int, int]:
        """The unpadded size of an image of `image_size` at the mask decoder's 256 scale."""
        from segment_anything.utils.transforms import ResizeLongestSide

        return ResizeLongestSide.get_preprocess_shape(image_size[0], image_size[1], MASK_PROMPT_SIDE)

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, points: list[tuple[int, int]], boxes: list[tuple[int, int, int, int]],
               size: tuple[int, int], mask_prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask-decoder call, a positive point (x, y) and a box (x1, y1, x2, y2) per prompt in an image of
        `size`, all with the same mask prompt: low-res mask logits [n, 1, 256, 256] and predicted IoUs [n]."""
        from segment_anything.utils.transforms import ResizeLongestSide

        model = self.model
        dev = self.device
        tf = ResizeLongestSide(model.image_encoder.img_size)
        box_t = tf.apply_boxes_torch(torch.tensor(boxes, dtype=torch.float32), size)
        point_t = tf.apply_coords_torch(torch.tensor(points, dtype=torch.float32), size)[:, None]
        sparse, dense = model.prompt_encoder(points=(point_t.to(dev), torch.ones(len(points), 1, device=dev)),
                                             boxes=box_t.to(dev), masks=mask_prompt.to(dev))
        low, iou = model.mask_decoder(image_embeddings=embedding,
                                      image_pe=model.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=False)
        return finite(low.float(), "SAM", self.path), finite(iou[:, 0].float(), "SAM", self.path)

    @torch.no_grad()
    def upscale_masks(self, low: torch.Tensor, enc: SamEncoding) -> torch.Tensor:
        """Low-res mask logits [n, 1, 256, 256] at the encoded image's original size: SAM's 256 -> 1024 -> crop
        -> original path."""
        return self.model.postprocess_masks(low, enc.input_size, enc.original_size)


def load_sam(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             cache: Path | None = None) -> SamModel:
    """Load Segment Anything (vit_b / vit_l / vit_h, or any encoder size read off the file). A SAM-HQ file loads
    as the SAM it extends: the same ViT encoder and mask decoder, its HQ extras left aside. `cache`: a folder where
    a bfloat16 copy is kept (`conversion.converted`)."""
    from segment_anything.build_sam import _build_sam

    sd = read_state_dict(path)
    expect_family(sd, "sam", path)
    sd = {k: v for k, v in sd.items() if not k.startswith(SAM_HQ_EXTRAS)}
    with complete(path, "SAM"):
        dim = sd["image_encoder.patch_embed.proj.weight"].shape[0]
        depth = count_blocks(sd, "image_encoder.blocks.")
        head_dim = sd[f"image_encoder.blocks.{depth - 1}.attn.rel_pos_h"].shape[1]
        global_idx = [i for i in range(depth)
                      if sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * 64 - 1]
        if depth - 1 not in global_idx:
            raise CheckpointError(f"{path}: the last SAM encoder block must use global attention")
        # the affinity reads the last block's relative positions itself, past the outputs `finite` checks (NaN there
        # gave a map and exit 0)
        refuse_non_finite(sd, [f"image_encoder.blocks.{depth - 1}.attn.rel_pos_{a}" for a in "hw"], path)
        model = on_meta(lambda: _build_sam(encoder_embed_dim=dim, encoder_depth=depth,
                                           encoder_num_heads=dim // head_dim, encoder_global_attn_indexes=global_idx,
                                           checkpoint=None))
    arch = _ARCHS.get((dim, depth), f"vit_{dim}x{depth}")
    # Prompt encoder and mask decoder stay float32 (as the reference keeps them), the encoder may be half.
    sd = converted(sd, path, "sam", dtype, lambda key: LOW if key.startswith("image_encoder.") else FLOAT32, cache)
    load_strict(model, sd, path, f"SAM {arch}")
    # pixel_mean/std are non-persistent buffers: rebuilt with the values segment_anything's _build_sam passes
    model.pixel_mean = torch.tensor(PIXEL_MEAN).view(-1, 1, 1)
    model.pixel_std = torch.tensor(PIXEL_STD).view(-1, 1, 1)
    check_materialised(model, path)
    return SamModel(place(model, device), arch, str(path))

