"""Other files of the shared models/sams folder: SAM-HQ loads as the SAM it extends; MobileSAM, EfficientSAM,
SAM 2 / 2.1 and SAM 3 are refused with one line naming the family and the files that work. Each layout is a small
file with the family's characteristic key names and tiny tensors."""

from __future__ import annotations

import pytest
import torch
from factory import small_sam_state

from trident_core.checkpoints import CheckpointError
from trident_core.models import load_clip, load_sam


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


def _hq_extras() -> dict[str, torch.Tensor]:
    """SAM-HQ's additions to SAM's mask decoder (the HQ token, its MLP and the feature fusion)."""
    return {"mask_decoder.hf_token.weight": _t(1, 32), "mask_decoder.hf_mlp.layers.0.weight": _t(32, 32),
            "mask_decoder.compress_vit_feat.0.weight": _t(64, 32, 2, 2),
            "mask_decoder.embedding_encoder.0.weight": _t(32, 8, 2, 2),
            "mask_decoder.embedding_maskfeature.0.weight": _t(8, 4, 3, 3)}


LAYOUTS = {
    "mobile_sam.pt": ("MobileSAM", {
        "image_encoder.patch_embed.seq.0.c.weight": _t(8, 3, 3, 3),
        "image_encoder.layers.0.blocks.0.conv1.c.weight": _t(8, 8, 1, 1),
        "image_encoder.layers.1.blocks.0.attn.qkv.weight": _t(24, 8), "image_encoder.neck.0.weight": _t(4, 8, 1, 1),
        "prompt_encoder.point_embeddings.0.weight": _t(1, 4), "mask_decoder.iou_token.weight": _t(1, 4)}),
    "sam_hq_vit_tiny.pth": ("MobileSAM", {
        "image_encoder.patch_embed.seq.0.c.weight": _t(8, 3, 3, 3), "image_encoder.neck.0.weight": _t(4, 8, 1, 1),
        "prompt_encoder.point_embeddings.0.weight": _t(1, 4), "mask_decoder.iou_token.weight": _t(1, 4),
        "mask_decoder.hf_token.weight": _t(1, 4)}),
    "efficient_sam_vitt.pt": ("EfficientSAM", {"model": {
        "image_encoder.patch_embed.proj.weight": _t(8, 3, 16, 16), "image_encoder.pos_embed": _t(1, 4, 8),
        "image_encoder.blocks.0.attn.qkv.weight": _t(24, 8), "image_encoder.neck.0.weight": _t(4, 8, 1, 1),
        "prompt_encoder.invalid_points.weight": _t(1, 4), "mask_decoder.iou_token.weight": _t(1, 4)}}),
    "sam2_hiera_tiny.pt": ("SAM 2", {"model": {
        "image_encoder.trunk.patch_embed.proj.weight": _t(8, 3, 7, 7), "image_encoder.trunk.pos_embed_window": _t(
            1, 8, 2, 2), "image_encoder.neck.convs.0.conv.weight": _t(4, 8, 1, 1),
        "sam_mask_decoder.iou_token.weight": _t(1, 4), "sam_prompt_encoder.point_embeddings.0.weight": _t(1, 4),
        "memory_attention.layers.0.self_attn.q_proj.weight": _t(4, 4), "maskmem_tpos_enc": _t(7, 1, 1, 4)}}),
    "sam2.1_hiera_base_plus.pt": ("SAM 2", {"model": {
        "image_encoder.trunk.patch_embed.proj.weight": _t(8, 3, 7, 7), "sam_mask_decoder.iou_token.weight": _t(1, 4),
        "no_mem_embed": _t(1, 1, 4)}}),
    "sam3.pt": ("SAM 3", {"model": {
        "detector.backbone.vision_backbone.trunk.patch_embed.proj.weight": _t(8, 3, 14, 14),
        "detector.backbone.vision_backbone.trunk.pos_embed": _t(1, 4, 8),
        "detector.transformer.decoder.layers.0.ca_text.in_proj_weight": _t(4, 4),
        "tracker.model.sam_mask_decoder.iou_token.weight": _t(1, 4)}}),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_other_sam_families_are_refused_in_one_line(tmp_path, name):
    family, content = LAYOUTS[name]
    path = tmp_path / name
    torch.save(content, path)
    with pytest.raises(CheckpointError) as err:
        load_sam(path)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and family in msg and "sam_vit_b_01ec64.pth" in msg
    assert "sam_hq_vit_b" in msg  # SAM-HQ files are named among those that work
    with pytest.raises(CheckpointError, match=f"looks like a {family}"):
        load_clip(path)


def test_sam_hq_loads_as_the_sam_it_extends(tmp_path):
    """SAM-HQ = SAM's ViT encoder and mask decoder (frozen during HQ training) + extras: it loads, and the model
    is exactly the SAM whose tensors it carries."""
    sam_sd = small_sam_state()
    torch.save(sam_sd, tmp_path / "sam_small.pth")
    torch.save({**sam_sd, **_hq_extras()}, tmp_path / "sam_hq_vit_b.pth")
    plain, hq = load_sam(tmp_path / "sam_small.pth"), load_sam(tmp_path / "sam_hq_vit_b.pth")
    a, b = plain.model.state_dict(), hq.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert hq.arch == plain.arch and not any("hf_token" in k for k in b)
