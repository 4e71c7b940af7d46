"""Model files damaged in their values or shapes: one line naming the file and what to do, never a traceback, and
never weights that load and then give NaN probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from factory import small_clip_state, small_dino_state, small_sam_state, write_small_checkpoints
from PIL import Image
from safetensors.torch import save_file

from trident_core.checkpoints import CheckpointError, read_state_dict
from trident_core.cli import main
from trident_core.models import load_dino, load_sam


def _save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize(("role", "key", "value"), [
    ("dino", "blocks.0.attn.qkv.weight", float("nan")),
    ("clip", "visual.proj", float("inf")),
    ("clip", "transformer.resblocks.0.mlp.c_fc.weight", float("nan")),  # (the text tower)
    ("sam", "image_encoder.blocks.0.attn.qkv.weight", float("-inf")),
])
def test_weights_holding_nan_or_inf_are_one_line_naming_the_file(tmp_path, capsys, role, key, value):
    """They loaded, gave all-NaN probabilities, an unlabelled map and exit 0."""
    state = {"clip": small_clip_state, "dino": small_dino_state, "sam": small_sam_state}[role]()
    state[key] = state[key].clone()
    state[key].view(-1)[:50] = value
    paths = write_small_checkpoints(tmp_path / "models")
    damaged = _save(paths[role].with_name(f"damaged_{role}.pth"), state)
    models = {r: str(damaged if r == role else paths[r]) for r in ("clip", "dino", "sam")}
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    rc = main(["segment", str(image), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-download",
               "--classes", "sky, grass", *(x for r, f in models.items() for x in (f"--{r}", f))])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, errors
    assert f"{role.upper()} {damaged} gave NaN/Inf values: the file is damaged" in errors[0]
    assert not (tmp_path / "out" / "labels.png").exists()


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
