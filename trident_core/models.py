"""Load CLIP (open_clip), DINO (timm ViT) and SAM (segment_anything) from their official checkpoint files.

The architecture is read off the file's tensors, so a wrong or corrupt file is refused with a message that
names the file and what was expected. Each loader returns a small typed wrapper that the pipeline and the
ComfyUI nodes pass around.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import SAM_HQ_EXTRAS, CheckpointError, expect_family, read_state_dict
from .onednn import use_onednn
from .sam_attention import use_banded_attention

# Architectures OpenAI released; their weights were trained with QuickGELU (open_clip's plain configs use GELU).
_OPENAI_ARCHS = {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"}


@dataclass(eq=False)
class ClipModel:
    """An open_clip CLIP model plus what Trident needs to know of it."""

    model: nn.Module
    arch: str
    patch_size: int
    path: str
    quick_gelu: bool
    text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    disk_cache: Path | None = field(default=None, repr=False)  # folder of text embeddings kept between runs

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype


@dataclass(eq=False)
class DinoModel:
    """A DINO ViT (timm's VisionTransformer with DINO's weights)."""

    model: nn.Module
    arch: str
    patch_size: int
    path: str

    @property
    def device(self) -> torch.device:
        return self.model.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.cls_token.dtype


@dataclass(eq=False)
class SamModel:
    """A segment_anything Sam model."""

    model: nn.Module
    arch: str
    path: str

    @property
    def device(self) -> torch.device:
        return self.model.image_encoder.patch_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_encoder.patch_embed.proj.weight.dtype

    @property
    def num_heads(self) -> int:
        return self.model.image_encoder.blocks[-1].attn.num_heads


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
    """load_state_dict(strict=True) with an error that says which file does not fit which model."""
    try:
        module.load_state_dict(sd, strict=True, assign=True)  # the file's tensors become the weights: no copy
    except RuntimeError as e:
        first = str(e).split("\n\t")[:3]
        raise CheckpointError(f"{path}: does not fit {what}: {' '.join(first)[:600]}") from e


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model's structure without allocating or initialising weights (the checkpoint's tensors are then
    assigned by `_load_strict`); saves the time of random initialisation that the file overwrites anyway."""
    with torch.device("meta"):
        return build()


def _check_materialised(module: nn.Module, path: str | os.PathLike) -> None:
    """Every parameter and buffer came from the file or was rebuilt (none left on the meta device)."""
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: the checkpoint lacks tensors the model needs: {', '.join(left[:5])}")


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _gelu_forward_in_place(self: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        return torch.ops.aten.gelu_(x, approximate=self.approximate)
    return F.gelu(x, approximate=self.approximate)


def _gelu_in_place(blocks: nn.Module) -> None:
    """The GELU of each block's MLP computed in place on the CPU (same kernel, same values): its input is the
    first linear layer's fresh output, which nothing else reads, so a [tokens, 4·dim] tensor is not allocated
    twice (SAM ViT-B: 50 MB per block)."""
    for blk in blocks:
        if isinstance(blk.mlp.act, nn.GELU):
            blk.mlp.act.forward = types.MethodType(_gelu_forward_in_place, blk.mlp.act)


def _place(module: nn.Module, device: torch.device | str, dtype: torch.dtype, attention: bool = False) -> nn.Module:
    """The model in inference mode on `device`, its layers through `onednn` (bit-identical; with `attention`
    also its self-attention, equal up to rounding: for CLIP, whose outputs meet no threshold)."""
    module = module.to(device=device, dtype=dtype).eval()
    module.requires_grad_(False)
    use_onednn(module, attention)
    return module


# ----------------------------------------------------------------------------------------------------- CLIP

def _clip_config(sd: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """open_clip config read off an OpenAI/open_clip-layout state dict; head widths from a matching named config."""
    import open_clip

    if "visual.proj" not in sd:
        raise CheckpointError("only ViT CLIP models are supported (this checkpoint has a ResNet image tower)")
    vision = dict(
        width=sd["visual.conv1.weight"].shape[0],
        layers=_count_blocks(sd, "visual.transformer.resblocks."),
        patch_size=sd["visual.conv1.weight"].shape[-1],
        image_size=sd["visual.conv1.weight"].shape[-1]
        * round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1)),
    )
    text = dict(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=sd["ln_final.weight"].shape[0],
        layers=_count_blocks(sd, "transformer.resblocks."),
    )
    embed_dim = sd["text_projection"].shape[1]
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        vc, tc = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if (cfg.get("embed_dim") == embed_dim and all(vc.get(k) == vision[k] for k in vision)
                and all(tc.get(k, 77 if k == "context_length" else 49408 if k == "vocab_size" else None) == text[k]
                        for k in text) and "hf_model_name" not in tc and not vc.get("timm_model_name")):
            vision["head_width"] = vc.get("head_width", 64)
            text["heads"] = tc.get("heads", text["width"] // 64)
            return name.removesuffix("-quickgelu"), dict(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
    vision["head_width"] = 64
    text["heads"] = max(1, text["width"] // 64)
    arch = f"ViT-w{vision['width']}-L{vision['layers']}-p{vision['patch_size']}"
    return arch, dict(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)


def load_clip(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              quick_gelu: bool | None = None) -> ClipModel:
    """Load a CLIP ViT from an open_clip state dict (.safetensors/.bin/.pt) or OpenAI's TorchScript file.

    `quick_gelu=None` uses QuickGELU for the architectures OpenAI released (their weights need it) and GELU
    otherwise (e.g. LAION's ViT-H-14)."""
    import open_clip

    sd = read_state_dict(path)
    expect_family(sd, "clip", path)
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):  # TorchScript extras
        sd.pop(key, None)
    arch, cfg = _clip_config(sd)
    qg = arch in _OPENAI_ARCHS if quick_gelu is None else quick_gelu
    model = _on_meta(lambda: open_clip.CLIP(**cfg, quick_gelu=qg))
    sd = {k: v.float() for k, v in sd.items()}
    _load_strict(model, sd, path, f"open_clip CLIP {arch}")
    n = model.positional_embedding.shape[0]  # the causal text mask is a non-persistent buffer: rebuilt as open_clip
    model.attn_mask = torch.full((n, n), float("-inf")).triu_(1)
    _check_materialised(model, path)
    return ClipModel(_place(model, device, dtype, attention=True), arch, cfg["vision_cfg"]["patch_size"], str(path), qg)


# ----------------------------------------------------------------------------------------------------- DINO

def load_dino(path: str | os.PathLike, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> DinoModel:
    """Load a DINO v1 ViT (e.g. dino_vitbase16_pretrain.pth, dino_deitsmall16_pretrain.pth) into timm's ViT."""
    from timm.models.vision_transformer import VisionTransformer

    sd = read_state_dict(path)
    expect_family(sd, "dino", path)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = _count_blocks(sd, "blocks.")
    grid = round(math.sqrt(sd["pos_embed"].shape[1] - 1))
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    heads = max(1, dim // 64)
    model = _on_meta(lambda: VisionTransformer(
        img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, num_classes=0))
    arch = {384: "ViT-S", 768: "ViT-B"}.get(dim, f"ViT-{dim}") + f"/{patch}"
    _load_strict(model, {k: v.float() for k, v in sd.items()}, path, f"DINO {arch}")
    _check_materialised(model, path)
    model = _place(model, device, dtype)
    _gelu_in_place(model.blocks)
    return DinoModel(model, arch, patch, str(path))


# ------------------------------------------------------------------------------------------------------ SAM

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
_SAM_ARCHS = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}


def load_sam(path: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> SamModel:
    """Load Segment Anything (vit_b / vit_l / vit_h, or any encoder size read off the file). A SAM-HQ file loads
    as the SAM it extends: the same ViT encoder and mask decoder, its HQ extras left aside."""
    from segment_anything.build_sam import _build_sam

    sd = read_state_dict(path)
    expect_family(sd, "sam", path)
    sd = {k: v for k, v in sd.items() if not k.startswith(SAM_HQ_EXTRAS)}
    dim = sd["image_encoder.patch_embed.proj.weight"].shape[0]
    depth = _count_blocks(sd, "image_encoder.blocks.")
    head_dim = sd[f"image_encoder.blocks.{depth - 1}.attn.rel_pos_h"].shape[1]
    global_idx = [i for i in range(depth) if sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * 64 - 1]
    if depth - 1 not in global_idx:
        raise CheckpointError(f"{path}: the last SAM encoder block must use global attention")
    model = _on_meta(lambda: _build_sam(encoder_embed_dim=dim, encoder_depth=depth, encoder_num_heads=dim // head_dim,
                                        encoder_global_attn_indexes=global_idx, checkpoint=None))
    arch = _SAM_ARCHS.get((dim, depth), f"vit_{dim}x{depth}")
    _load_strict(model, {k: v.float() for k, v in sd.items()}, path, f"SAM {arch}")
    # pixel_mean/std are non-persistent buffers: rebuilt with the values segment_anything's _build_sam passes
    model.pixel_mean = torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)
    model.pixel_std = torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
    _check_materialised(model, path)
    # Prompt encoder and mask decoder stay float32 (as the reference keeps them), the encoder may be half.
    model = _place(model, device, torch.float32)
    model.image_encoder.to(dtype)
    use_banded_attention(model.image_encoder)
    _gelu_in_place(model.image_encoder.blocks)
    return SamModel(model, arch, str(path))

