"""Random-weight checkpoints of small configurations of the real architectures, in the official file formats."""

from __future__ import annotations

from pathlib import Path

import torch


def _randomize(module: torch.nn.Module, seed: int, qk_gain: float = 2.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 * (qk_gain if "qkv" in name else 1))
            elif name.endswith("weight"):
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def small_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    import open_clip

    m = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=224, patch_size=16, width=64, layers=2, head_width=64),
                       text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=True)
    _randomize(m, seed)
    return m.state_dict()


def small_dino_state(seed: int = 1) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=1, num_classes=0)
    _randomize(m, seed, qk_gain=4.0)
    return m.state_dict()


def small_sam_state(seed: int = 2, iou_bias: float = 0.8) -> dict[str, torch.Tensor]:
    from segment_anything.build_sam import _build_sam

    with torch.random.fork_rng():  # (its prompt encoder's random Fourier features are a buffer drawn when built)
        torch.manual_seed(seed)
        m = _build_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=1, encoder_global_attn_indexes=[1],
                       checkpoint=None)
    _randomize(m, seed)
    with torch.no_grad():
        last = m.mask_decoder.iou_prediction_head.layers[-1]
        last.weight.mul_(0.3)
        last.bias.fill_(iou_bias)
    return m.state_dict()


def write_small_checkpoints(folder: Path) -> dict[str, Path]:
    """clip (.safetensors and .bin), dino (.pth) and sam (.pth) files in `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    clip = small_clip_state()
    paths = {"clip": folder / "clip_small.safetensors", "clip_bin": folder / "clip_small.bin",
             "dino": folder / "dino_small.pth", "sam": folder / "sam_small.pth"}
    save_file({k: v.contiguous() for k, v in clip.items()}, str(paths["clip"]))
    torch.save(clip, paths["clip_bin"])
    torch.save(small_dino_state(), paths["dino"])
    torch.save(small_sam_state(), paths["sam"])
    return paths
