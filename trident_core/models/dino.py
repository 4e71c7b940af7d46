"""DINO through timm: the one module that knows timm's VisionTransformer. Trident needs of DINO only its final
normalised patch tokens for each window, with DINO's position-embedding interpolation."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import complete, expect_family, read_state_dict
from ..posembed import cached_pos_embed
from .conversion import converted
from .loading import check_materialised, count_blocks, finite, load_strict, on_meta, place


@dataclass(eq=False)
class DinoModel:
    """A DINO ViT (timm's VisionTransformer with DINO's weights)."""

    model: nn.Module
    arch: str
    patch_size: int
    path: str
    positions: dict = field(default_factory=dict, repr=False)  # see posembed.cached_pos_embed

    @property
    def device(self) -> torch.device:
        return self.model.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.cls_token.dtype

    @torch.no_grad()
    def patch_tokens(self, x: torch.Tensor, after_block: Callable[[nn.Module], object] | None = None) -> torch.Tensor:
        """The final normalised patch tokens [k, g*g, D] of ImageNet-normalised windows x [k, 3, w, w];
        `after_block` gets each block once it has run (e.g. `residency.release`)."""
        m = self.model
        x = x.to(device=self.device, dtype=self.dtype)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([m.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + cached_pos_embed(self.positions, m.pos_embed[0], grid)[None]
        t = m.norm_pre(m.pos_drop(t))
        for blk in m.blocks:  # (timm's forward: the blocks in order)
            t = blk(t)
            if after_block is not None:
                after_block(blk)
        t = m.norm(t)
        return finite(t[:, 1:], "DINO", self.path)


def load_dino(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              cache: Path | None = None) -> DinoModel:
    """Load a DINO v1 ViT (e.g. dino_vitbase16_pretrain.pth, dino_deitsmall16_pretrain.pth) into timm's ViT
    (`cache`: a folder where a bfloat16 copy is kept, `conversion.converted`)."""
    from timm.models.vision_transformer import VisionTransformer

    sd = read_state_dict(path)
    expect_family(sd, "dino", path)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    with complete(path, "DINO ViT"):
        dim = sd["cls_token"].shape[-1]
        patch = sd["patch_embed.proj.weight"].shape[-1]
        depth = count_blocks(sd, "blocks.")
        grid = round(math.sqrt(sd["pos_embed"].shape[1] - 1))
        if grid < 1:  # (it loaded, and the first image was a ZeroDivisionError)
            raise ValueError(f"its position table pos_embed {tuple(sd['pos_embed'].shape)} holds no patch positions")
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
        heads = max(1, dim // 64)
        model = on_meta(lambda: VisionTransformer(
            img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
            qkv_bias="blocks.0.attn.qkv.bias" in sd, num_classes=0,
            weight_init="skip"))  # (the file's tensors replace every weight: timm's init ran 0.11 s on meta tensors)
    arch = {384: "ViT-S", 768: "ViT-B"}.get(dim, f"ViT-{dim}") + f"/{patch}"
    load_strict(model, converted(sd, path, "dino", dtype, cache=cache), path, f"DINO {arch}")
    check_materialised(model, path)
    return DinoModel(place(model, device), arch, patch, str(path))
