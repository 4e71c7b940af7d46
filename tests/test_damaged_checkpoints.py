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
from trident_core.models import load_clip, load_dino, load_sam


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
    sd["blocks.x.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].clone()


def _sam_no_head_width(sd: dict) -> None:
    for k in [k for k in sd if k.endswith("attn.rel_pos_h")]:
        sd[k] = torch.zeros(sd[k].shape[0], 0)




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


@pytest.mark.parametrize(("key", "value"), [("rel_pos_h", float("nan")), ("rel_pos_w", float("inf"))])
def test_sam_last_block_relative_positions_holding_nan_are_one_line(tmp_path, capsys, key, value):
    """The affinity reads these tables itself, past the outputs checked for NaN: a map was written and exit 0."""
    state = small_sam_state()
    name = f"image_encoder.blocks.1.attn.{key}"  # (the small SAM's last block)
    state[name] = state[name].clone()
    state[name][:5] = value
    paths = write_small_checkpoints(tmp_path / "models")
    damaged = _save(tmp_path / "damaged_sam.pth", state)
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    rc = main(["segment", str(image), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-download",
               "--classes", "sky, grass", "--clip", str(paths["clip"]), "--dino", str(paths["dino"]), "--sam",
               str(damaged)])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, errors
    assert f"{damaged}: the tensor {name!r} holds NaN/Inf values" in errors[0] and "download it again" in errors[0]
    assert not (tmp_path / "out" / "labels.png").exists()


def _dino_class_position_only(sd: dict) -> None:
    sd["pos_embed"] = sd["pos_embed"][:, :1].clone()


def _clip_class_position_only(sd: dict) -> None:
    sd["visual.positional_embedding"] = sd["visual.positional_embedding"][:1].clone()


def _clip_no_text_positions(sd: dict) -> None:
    sd["positional_embedding"] = sd["positional_embedding"][:0].clone()


def _clip_small_token_table(sd: dict) -> None:
    sd["token_embedding.weight"] = sd["token_embedding.weight"][:10].clone()


@pytest.mark.parametrize(("load", "state", "spoil", "what", "said"), [
    (load_dino, small_dino_state, _dino_scalar_cls, "DINO ViT", ""),
    (load_dino, small_dino_state, _dino_empty_pos, "DINO ViT", ""),
    (load_dino, small_dino_state, _dino_bad_block, "DINO ViT", ""),
    (load_sam, small_sam_state, _sam_no_head_width, "SAM", ""),
    # (these loaded: the first image was a ZeroDivisionError traceback (no patch positions), every class name "too
    # long for CLIP, which takes 0 tokens", or the first class name an IndexError traceback (a token table cut))
    (load_dino, small_dino_state, _dino_class_position_only, "DINO ViT", "holds no patch positions"),
    (load_clip, small_clip_state, _clip_class_position_only, "CLIP", "holds no patch positions"),
    (load_clip, small_clip_state, _clip_no_text_positions, "CLIP", "positional_embedding (0, 64) is empty"),
    (load_clip, small_clip_state, _clip_small_token_table, "CLIP", "has 10 rows, under the 49408 token ids"),
])
def test_shapes_that_build_no_model_are_one_line(tmp_path, load, state, spoil, what, said):
    sd = state()
    spoil(sd)
    path = _save(tmp_path / "model.safetensors", sd)
    with pytest.raises(CheckpointError) as e:
        load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: its tensors do not make a {what} (") and said in message, message
    assert "use the official file" in message and "\n" not in message


@pytest.mark.parametrize(("load", "state", "prefix", "what"), [
    (load_dino, small_dino_state, "blocks.", "DINO ViT"),
    (load_clip, small_clip_state, "visual.transformer.resblocks.", "CLIP"),
    (load_clip, small_clip_state, "transformer.resblocks.", "CLIP"),
    (load_sam, small_sam_state, "image_encoder.blocks.", "SAM"),
])
def test_blocks_numbered_with_gaps_are_one_line_before_building_a_model(tmp_path, load, state, prefix, what):
    """A block numbered 1000 built 1001 blocks (100000: minutes and a MemoryError traceback) before the file was
    found not to fit, or was a missing tensor of block 2."""
    sd = state()
    block0 = [k for k in sd if k.startswith(f"{prefix}0.")]
    sd.update({k.replace(f"{prefix}0.", f"{prefix}1000.", 1): sd[k] for k in block0})
    path = _save(tmp_path / "model.pth", sd)
    with pytest.raises(CheckpointError) as e:
        load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: its tensors do not make a {what} (ValueError: the blocks '{prefix}<i>' are "
                              f"not numbered 0 to "), message
    assert "(found 0, " in message and ", 1000))" in message and "\n" not in message


def _zeroed_start(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = bytes(16)
    path.write_bytes(bytes(data))


def _damaged_pickle_in_zip(path: Path) -> None:
    """Bytes of the zip's data.pkl overwritten (torch.save stores its members uncompressed)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + int.from_bytes(
        data[info.header_offset + 28:info.header_offset + 30], "little")
    data[start + 2:start + 40] = b"\xff" * 38
    path.write_bytes(bytes(data))


def _legacy_cut_in_a_name(path: Path) -> None:
    torch.save(small_dino_state(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"torch._utils") + 11])


@pytest.mark.parametrize(("name", "damage"), [
    ("dino.safetensors", _zeroed_start),
    ("dino.pth", _zeroed_start),
    ("dino.pth", _damaged_pickle_in_zip),
    ("dino.pth", _legacy_cut_in_a_name),
    ("dino.bin", lambda p: p.write_bytes(bytes(range(256)) * 64)),
])
def test_damaged_bytes_are_corrupt_not_pickled(tmp_path, name, damage):
    """A zeroed header, damaged pickle bytes, a legacy file cut inside a name or plain garbage were "refused: the
    file contains pickled Python objects" (the safe unpickler met bytes that are no pickle instruction at all)."""
    path = _save(tmp_path / name, small_dino_state())
    damage(path)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    message = str(e.value)
    assert message.startswith(f"{path}: cannot be read; the file is corrupt or truncated") and "pickled" not in message
    assert "download it again" in message and "\n" not in message
