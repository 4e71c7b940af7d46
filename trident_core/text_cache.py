"""Text embeddings kept on disk between runs, so a second run with the same classes skips CLIP's text encoder.

A cache file is keyed by the CLIP file's content (size and SHA-256, see file_digest.py), its activation (QuickGELU
or GELU: the same file runs either way), the names, the prompt templates, the dtype and the device kind. Files are
written atomically (safetensors, no pickle); one that cannot be read or does not fit is ignored and rewritten, and a
cache folder that cannot be written only costs the encoding again next time (caches.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import caches, jsonfile
from .atomic import write_atomic
from .file_digest import file_digest


def cache_file(folder: Path, clip_path: str, names: list[str], templates: list[Callable[[str], str]],
               dtype: torch.dtype, device_kind: str, quick_gelu: bool) -> Path:
    """Where the embeddings of `names` made with this CLIP file and activation, templates, dtype and device kind are
    kept."""
    key = json.dumps([file_digest(clip_path, folder), names, [t("{}") for t in templates], str(dtype), device_kind,
                      *(["quick_gelu"] if quick_gelu else [])])
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"


def load(path: Path, names: list[str], dim: int) -> torch.Tensor | None:
    """The cached [len(names), dim] float32 embeddings, or None when absent, unreadable or not what is asked."""
    from safetensors.torch import load as load_bytes

    try:
        if not path.is_file():  # (may itself fail: a folder that cannot be entered, a name too long)
            return None
        if path.stat().st_size > len(names) * dim * 4 + 4 * len(json.dumps(names)) + (1 << 20):
            raise ValueError(f"{path.stat().st_size} bytes, far more than {len(names)} embeddings take")
        data = path.read_bytes()
        emb = load_bytes(data)["embeddings"]
        stored = jsonfile.parse(_metadata(data).get("names", "null"))
    except Exception as e:  # noqa: BLE001 - a cache file in any state of damage is only a miss
        caches.miss("text embeddings", str(path), e)
        return None
    ok = (stored == names and emb.dtype == torch.float32 and tuple(emb.shape) == (len(names), dim)
          and bool(torch.isfinite(emb).all()) and _unit_rows(emb))
    if not ok:
        caches.miss("text embeddings", str(path), "the file holds other names or damaged values")
    return emb if ok else None


def _unit_rows(emb: torch.Tensor) -> bool:
    """Whether every row has length 1, as every embedding written has (L2-normalised): a zeroed or overwritten
    stretch of the file is not."""
    return bool(((emb.norm(dim=-1) - 1).abs() < 1e-3).all())


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (names of the rows)."""
    size = int.from_bytes(data[:8], "little")
    header = jsonfile.parse(data[8:8 + size].decode("utf-8"))
    return header.get("__metadata__", {}) if isinstance(header, dict) else {}


def save(path: Path, names: list[str], emb: torch.Tensor) -> None:
    """Write the embeddings atomically (a concurrent writer of the same key writes the same content)."""
    from safetensors.torch import save as save_bytes

    data = save_bytes({"embeddings": emb.detach().float().cpu().contiguous()}, metadata={"names": json.dumps(names)})
    try:
        write_atomic(path, data)
    except OSError as e:
        caches.miss("text embeddings", str(path.parent), e)
