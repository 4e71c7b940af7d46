"""Model files damaged in their values or shapes: one line naming the file and what to do, never a traceback, and
never weights that load and then give NaN probabilities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factory import small_clip_state, small_dino_state, small_sam_state
from safetensors.torch import save_file

from trident_core.checkpoints import CheckpointError, read_state_dict
from trident_core.models import load_clip, load_dino, load_sam


def _save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize(("load", "state", "key", "value", "name"), [
    (load_dino, small_dino_state, "blocks.0.attn.qkv.weight", float("nan"), "dino.pth"),
    (load_clip, small_clip_state, "visual.proj", float("inf"), "clip.safetensors"),
    (load_sam, small_sam_state, "image_encoder.neck.0.weight", float("-inf"), "sam.pth"),
])
def test_weights_holding_nan_or_inf_are_refused(tmp_path, load, state, key, value, name):
    sd = state()
    sd[key] = sd[key].clone()
    sd[key].view(-1)[7] = value
    path = _save(tmp_path / name, sd)
    with pytest.raises(CheckpointError) as e:
        load(path)
    assert str(e.value) == (f"{path}: the tensor {key!r} holds NaN/Inf values (the file is damaged): delete it and "
                            "download it again")


def test_half_precision_weights_are_checked_without_overflowing(tmp_path):
    """A half-precision file's many values sum past float16's 65504: the check sums in float32."""
    sd = {k: v.half() for k, v in small_dino_state().items()}
    sd["pos_embed"] = torch.full_like(sd["pos_embed"], 60000.0)
    assert set(read_state_dict(_save(tmp_path / "dino_fp16.pth", sd))) == set(sd)


@pytest.mark.parametrize("kind", ["sparse", "complex"])
def test_sparse_or_complex_tensors_are_refused(tmp_path, kind):
    sd = small_dino_state()
    w = sd["blocks.0.mlp.fc1.weight"]
    sd["blocks.0.mlp.fc1.weight"] = w.to_sparse() if kind == "sparse" else w.to(torch.complex64)
    path = _save(tmp_path / "dino.pth", sd)
    with pytest.raises(CheckpointError, match=r"the tensor 'blocks.0.mlp.fc1.weight' is .* not plain real numbers"):
        load_dino(path)


def _dino_scalar_cls(sd: dict) -> None:
    sd["cls_token"] = torch.tensor(0.5)


def _dino_empty_pos(sd: dict) -> None:
    sd["pos_embed"] = torch.zeros(1, 0, sd["pos_embed"].shape[-1])


def _dino_bad_block(sd: dict) -> None:
    sd["blocks.x.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"]


def _sam_no_head_width(sd: dict) -> None:
    for k in [k for k in sd if k.endswith("attn.rel_pos_h")]:
        sd[k] = torch.zeros(sd[k].shape[0], 0)


@pytest.mark.parametrize(("load", "state", "spoil", "what"), [
    (load_dino, small_dino_state, _dino_scalar_cls, "DINO ViT"),
    (load_dino, small_dino_state, _dino_empty_pos, "DINO ViT"),
    (load_dino, small_dino_state, _dino_bad_block, "DINO ViT"),
    (load_sam, small_sam_state, _sam_no_head_width, "SAM"),
])
def test_shapes_that_build_no_model_are_one_line(tmp_path, load, state, spoil, what):
    sd = state()
    spoil(sd)
    path = _save(tmp_path / "model.pth", sd)
    with pytest.raises(CheckpointError) as e:
        load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: its tensors do not make a {what} (") and "use the official file" in message
    assert "\n" not in message


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("damage", ["five_bytes_pth", "five_bytes_safetensors", "header_longer_than_file",
                                    "zip_cut_in_half"])
def test_cut_or_damaged_files_say_corrupt_not_pickled(tmp_path, damage):
    """They were "refused: the file contains pickled Python objects", which sends a user looking for malware."""
    sd = small_dino_state()
    if damage == "five_bytes_pth":
        path = _save(tmp_path / "dino.pth", sd)
        _cut(path, 5)
    elif damage == "five_bytes_safetensors":
        path = _save(tmp_path / "dino.safetensors", sd)
        _cut(path, 5)
    elif damage == "header_longer_than_file":
        path = _save(tmp_path / "dino.safetensors", sd)
        data = bytearray(path.read_bytes())
        data[:8] = (len(data) * 2).to_bytes(8, "little")
        path.write_bytes(bytes(data))
    else:
        path = _save(tmp_path / "dino.pth", sd)
        _cut(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    assert "the file is corrupt or truncated" in str(e.value) and "download it again" in str(e.value)
    assert "pickled" not in str(e.value)
