"""Read checkpoint files safely (no pickled code) and tell which model a state dict belongs to."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .torchscript import is_torchscript, read_torchscript_state_dict


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, unsafe or of the wrong model."""


_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module", "student")
_PREFIXES = ("module.", "backbone.")


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original CLIP files are TorchScript archives (a zip holding `code/` and `constants.pkl`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return is_torchscript(zf)


def _read_torchscript(p: Path) -> dict[str, torch.Tensor]:
    """A TorchScript archive's tensors, read without compiling or running any of its code."""
    try:
        with zipfile.ZipFile(p) as zf:
            return read_torchscript_state_dict(zf)
    except Exception as e:  # noqa: BLE001 - an untrusted file: every way it can fail is one message
        raise CheckpointError(
            f"{p}: refused: a TorchScript archive that holds more than a scripted model's tensors, or is corrupt "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Its code is never run; use the "
            "official checkpoint file."
        ) from e


def _is_safetensors(head: bytes, file_size: int) -> bool:
    """safetensors files start with an 8-byte little-endian header length and a JSON header ("{")."""
    size = int.from_bytes(head[:8], "little")
    return len(head) >= 9 and head[8:9] == b"{" and 0 < size < min(100_000_000, file_size - 7)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict in common wrappers ({"state_dict": ...}, {"model": ...}) and drop DDP prefixes."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no tensors (found {type(obj).__name__}); is this a model checkpoint?")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors; is this a model checkpoint?")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return _backbone(sd)


def _backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training checkpoint's backbone (DINO's teacher or student: `backbone.*` beside its projection `head.*`)
    as a plain ViT's tensors; any other dict as it is."""
    if any(k.startswith("backbone.") for k in sd) and all(k.startswith(("backbone.", "head.")) for k in sd):
        return {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _torch_load(p: Path) -> object:
    """torch.load with weights_only, memory-mapped where possible (the weights are not copied twice). PyTorch's
    warning about a pickle protocol it did not write is silenced: what it cannot unpickle is refused in one line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return _torch_load_quiet(p)


def _torch_load_quiet(p: Path) -> object:
    if p.suffix == ".safetensors":  # torch.load treats this name as safetensors; read the content as what it is
        with open(p, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(p), map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _unpickler_reason(e: pickle.UnpicklingError) -> str:
    """What the safe unpickler refused (e.g. "Unsupported global: GLOBAL posix.system"), without PyTorch's preamble
    suggesting weights_only=False."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # (PyTorch's message holds terminal colour codes)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"it refers to {named.group(1)}"
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:
        return f"it uses pickle instructions a weights file never needs (operand {operand.group(1)})"
    after = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return after.group(1).strip() if after else "it holds Python objects besides tensors"


@contextmanager
def complete(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Around reading a model's shape off its tensors: a tensor the file lacks is one line naming it (it was a bare
    KeyError)."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: lacks the tensor {e.args[0]!r} of a {what} checkpoint: is the file complete "
                              "and of a supported architecture? Use the official file") from None
    except (IndexError, ValueError, TypeError, ZeroDivisionError, RuntimeError, AssertionError) as e:
        # (a scalar where a matrix belongs, an empty position table, a block named 'blocks.x': shapes that build
        # no model)
        raise CheckpointError(f"{path}: its tensors do not make a {what} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else 'bad shapes'}): the file is damaged or of "
                              "an unsupported architecture; use the official file") from None


def _refuse_text(p: Path, head: bytes) -> None:
    """Refuse the text files that stand where a checkpoint should be (else "pickled Python objects" was said)."""
    head = head.lstrip().lower()
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{p}: a Git LFS pointer (a small text file standing for the weights), not the "
                              "weights: fetch the file itself ('git lfs pull' in its repository, or download it)")
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"{\"error", b"{\"message")):
        raise CheckpointError(f"{p}: a web page or an error message, not a checkpoint (a failed download?): delete "
                              "it and download the file again")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a .safetensors / .pth / .pt / .bin file on the CPU without executing pickled code."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p}: the file is empty; delete it and download it again")
    with open(p, "rb") as f:
        head = f.read(512)  # (what the format checks below read)
    _refuse_text(p, head)
    return _check_values(_read(p, head, size), p)


def _read(p: Path, head: bytes, size: int) -> dict[str, torch.Tensor]:
    """The file's tensors by its format (safetensors, TorchScript or a weights-only pickle), `head` its first
    bytes, `size` its length."""
    try:
        if _is_safetensors(head, size):
            from safetensors.torch import load_file

            return _unwrap(load_file(str(p), device="cpu"), p)
        if _cut_short(p, head, size):
            raise EOFError("it ends before its own structure does")
        if _is_torchscript(p):
            return _unwrap(_read_torchscript(p), p)
        return _unwrap(_torch_load(p), p)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "truncated" in str(e) or "ran out of input" in str(e).lower() or _not_a_pickle(e):
            raise _corrupt(p, e) from e
        raise CheckpointError(
            f"{p}: refused: the file contains pickled Python objects, not just tensors, and is not loaded "
            f"for safety (weights_only=True). Use the official checkpoint file. ({_unpickler_reason(e)})"
        ) from e
    except Exception as e:  # noqa: BLE001 (a damaged file breaks the readers in any way: IndexError, KeyError...)
        raise _corrupt(p, e) from e


def _not_a_pickle(e: pickle.UnpicklingError) -> bool:
    """What the safe unpickler stopped at is no pickle at all: a byte that is no pickle instruction, or a global
    whose name is cut (damaged or zeroed bytes, a file cut short: they were "pickled Python objects", which sends a
    user looking for malware). A real pickle's refused instruction or global is still refused as pickled objects."""
    import pickletools

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:
        code = int(operand.group(1))
        return code > 255 or chr(code) not in {op.code for op in pickletools.opcodes}
    named = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    return bool(named) and not all(part.isidentifier() for part in named.group(1).split("."))


def _corrupt(p: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{p}: cannot be read; the file is corrupt or truncated (an interrupted download?). "
        f"Delete it and download it again. ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def _cut_short(p: Path, head: bytes, size: int) -> bool:
    """A file too short for any checkpoint (under 9 bytes), a safetensors header of an impossible length, or a zip
    (PyTorch's format) without its closing directory: cut short or damaged (they were said to hold pickled
    objects)."""
    return (len(head) < 9 or head[8:9] == b"{" and not _is_safetensors(head, size)
            or head[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(p))


def _check_values(sd: dict[str, torch.Tensor], p: Path) -> dict[str, torch.Tensor]:
    """Refuse sparse, complex and quantised tensors: no weights file holds them. (NaN or Inf values are found in
    the models' outputs, `models.loading.finite`: reading every weight here made the memory-mapped files resident.)"""
    for name, t in sd.items():
        if t.layout != torch.strided or t.is_complex() or t.is_quantized:
            raise CheckpointError(f"{p}: the tensor {name!r} is {t.layout} {t.dtype}, not plain real numbers: not a "
                                  "model file Trident reads; use the official file")
    return sd


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks (what identifies a model file whatever its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# Keys SAM-HQ adds to SAM's mask decoder (its HQ output token and feature fusion); SAM's own decoder keys stay.
SAM_HQ_EXTRAS = tuple(f"mask_decoder.{m}." for m in ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder",
                                                       "embedding_maskfeature"))


def _sam_variant(sd: dict[str, torch.Tensor]) -> str | None:
    """Which member of the Segment Anything family a state dict holds, or None for none of them."""
    if any(k.startswith("detector.backbone.vision_backbone.") or k.startswith("tracker.") for k in sd):
        return "sam3"
    if any(k.startswith(("image_encoder.trunk.", "sam_mask_decoder.", "memory_attention.")) for k in sd):
        return "sam2"
    if not (any(k.startswith("image_encoder.") for k in sd) and any(k.startswith("mask_decoder.") for k in sd)):
        return None
    if "image_encoder.patch_embed.proj.weight" not in sd:
        return "mobile_sam"  # TinyViT image encoder (MobileSAM, SAM-HQ's light model)
    if "prompt_encoder.invalid_points.weight" in sd or "image_encoder.blocks.0.attn.rel_pos_h" not in sd:
        return "efficient_sam"  # a plain ViT without SAM's relative positions
    return "sam"  # SAM, or SAM-HQ (SAM's ViT and decoder plus its HQ extras)


def identify(sd: dict[str, torch.Tensor]) -> str:
    """Which model family a state dict holds: "clip", "dino", "sam" (SAM and SAM-HQ), another SAM family
    ("mobile_sam", "efficient_sam", "sam2", "sam3") or "unknown"."""
    if "visual.conv1.weight" in sd and "token_embedding.weight" in sd:
        return "clip"
    variant = _sam_variant(sd)
    if variant:
        return variant
    if "cls_token" in sd and "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "dino"
    return "unknown"


FAMILY_FILES = {
    "clip": "an open_clip CLIP checkpoint, e.g. open_clip_model.safetensors (ViT-B-16 openai) or OpenAI's ViT-B-16.pt",
    "dino": "a DINO ViT checkpoint, e.g. dino_vitbase16_pretrain.pth",
    "sam": "a Segment Anything checkpoint, e.g. sam_vit_b_01ec64.pth",
}
OTHER_SAMS = {"mobile_sam": "MobileSAM (a TinyViT image encoder)", "efficient_sam": "EfficientSAM",
              "sam2": "SAM 2 / 2.1 (a Hiera image encoder)", "sam3": "SAM 3"}
SAM_FILES_THAT_WORK = ("sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth or SAM-HQ's "
                       "sam_hq_vit_b/l/h.pth")


def expect_family(sd: dict[str, torch.Tensor], family: str, path: str | os.PathLike) -> None:
    """Raise a clear error when a file of another model was selected; another SAM family in the SAM slot is
    named, with the files that work (Trident's affinity needs SAM's ViT image encoder)."""
    found = identify(sd)
    if family == "sam" and found in OTHER_SAMS:
        raise CheckpointError(f"{path}: is a {OTHER_SAMS[found]} checkpoint, which Trident cannot use (its "
                              "affinity needs SAM's ViT image encoder); select one of "
                              f"{SAM_FILES_THAT_WORK} from models/sams.")
    if found in OTHER_SAMS:
        raise CheckpointError(f"{path}: is not {FAMILY_FILES[family]}; it looks like a {OTHER_SAMS[found]} "
                              "checkpoint. Select the right file for this slot.")
    if found != family:
        what = (f"it looks like {FAMILY_FILES[found].split(',')[0]}" if found in FAMILY_FILES
                else "its tensors match no known model")
        raise CheckpointError(f"{path}: is not {FAMILY_FILES[family]}; {what}. Select the right file for this slot.")
