"""Text embeddings kept on disk between runs, so a second run with the same classes skips CLIP's text encoder.

A cache file is keyed by the CLIP file's content (size and SHA-256, hashed once per path, size and modification
time and remembered beside the cache), the names, the prompt templates, the dtype and the device kind. Files are
written atomically (safetensors, no pickle); one that cannot be read or does not fit is ignored and rewritten."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .atomic import write_atomic

HASHES = "file-hashes.json"
_memo: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike, memo_folder: Path) -> str:
    """"<size>-<sha256>" of a file; computed once per (path, size, mtime) and remembered in `memo_folder`."""
    full = os.path.abspath(path)
    st = os.stat(full)
    key = (full, st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    memo_file = memo_folder / HASHES
    known = _read_memo(memo_file)
    entry = known.get(full)
    if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [st.st_size, st.st_mtime_ns] \
            and isinstance(entry[2], str):
        digest = entry[2]
    else:
        h = hashlib.sha256()
        with open(full, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        digest = f"{st.st_size}-{h.hexdigest()}"
        known[full] = [st.st_size, st.st_mtime_ns, digest]
        write_atomic(memo_file, json.dumps(known, indent=1, sort_keys=True).encode())
    _memo[key] = digest
    return digest


def _read_memo(path: Path) -> dict:
    """The remembered file digests ({} when absent or damaged)."""
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def cache_file(folder: Path, clip_path: str, names: list[str], templates: list[Callable[[str], str]],
               dtype: torch.dtype, device_kind: str) -> Path:
    """Where the embeddings of `names` made with this CLIP file, templates, dtype and device kind are kept."""
    key = json.dumps([file_digest(clip_path, folder), names, [t("{}") for t in templates], str(dtype), device_kind])
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"


def load(path: Path, names: list[str], dim: int) -> torch.Tensor | None:
    """The cached [len(names), dim] float32 embeddings, or None when absent, unreadable or not what is asked."""
    from safetensors.torch import load as load_bytes

    try:
        data = path.read_bytes()
        emb = load_bytes(data)["embeddings"]
        stored = json.loads(_metadata(data).get("names", "null"))
    except Exception:  # noqa: BLE001 - a cache file in any state of damage is only a miss
        return None
    ok = (stored == names and emb.dtype == torch.float32 and tuple(emb.shape) == (len(names), dim)
          and bool(torch.isfinite(emb).all()))
    return emb if ok else None


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (names of the rows)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {})


def save(path: Path, names: list[str], emb: torch.Tensor) -> None:
    """Write the embeddings atomically (a concurrent writer of the same key writes the same content)."""
    from safetensors.torch import save as save_bytes

    data = save_bytes({"embeddings": emb.detach().float().cpu().contiguous()}, metadata={"names": json.dumps(names)})
    write_atomic(path, data)
