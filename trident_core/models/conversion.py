"""A checkpoint's tensors in the dtypes a model runs in, without the file's float32 weights resident beside them.

A tensor is kept in the low dtype asked for (bfloat16), in float32, or as a pair of low tensors whose sum is the
float32 value within 2^-16 (`split_pair`: products with both keep a weight matrix's own rounding error out of the
result; models/precision.py). `cast` converts one tensor at a time and releases each memory-mapped source's pages
once its copy is made. With a cache folder (the command line's), a narrowing conversion (float32 -> bfloat16)
is done once per file content: the converted tensors are streamed into a safetensors file there, one at a time
(never all resident at once), keyed by the source file's size and SHA-256, with the CRC-32 of its bytes in its
metadata; later runs check that CRC and memory-map the copy (a cache by `caches`' rules: any failure is a logged
miss; the KEEP most recently used copies per model are kept). Its pages are file-backed like a float32
checkpoint's, so a stage's weights can be released when it is done (residency.py), and no run after the first
converts anything."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import torch

from .. import caches
from ..atomic import partial_name, remove_entry, remove_partials
from ..checkpoints import CheckpointError, read_state_dict
from ..file_digest import DIGEST, file_digest
from ..residency import releaser, trim_heap

FORMAT = 2  # of the cached copies (1: torch.save's zip, 2: streamed safetensors): a new one gives them new names
KEEP = 2  # copies kept per model role, the most recently used: a replaced checkpoint's copy does not stay for good
LOW, FLOAT32, PAIR = "low", "float32", "pair"
LO = "_lo"  # a pair's second tensor is kept under its key + LO
Layout = Callable[[str], str]  # how the floating tensor `key` is kept: LOW (the dtype asked for), FLOAT32, or PAIR
Want = dict[str, tuple[tuple[int, ...], torch.dtype]]  # each tensor's shape and dtype
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
KIND = "converted weights"  # (caches.miss)


def all_low(_key: str) -> str:
    return LOW


def split_pair(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t as hi + lo, both in `dtype`: hi is t rounded, lo the rounding error rounded (their sum holds 16 of float32's
    24 significant bits in bfloat16, where hi alone holds 8)."""
    hi = t.to(dtype)
    return hi, (t.float() - hi.float()).to(dtype)


def _expected(sd: dict[str, torch.Tensor], dtype: torch.dtype, layout: Layout) -> Want:
    """Shape and dtype of each tensor `cast` gives (a pair's second tensor included)."""
    out = {}
    for key, t in sd.items():
        kind = layout(key) if t.is_floating_point() else None
        out[key] = (tuple(t.shape), t.dtype if kind is None else torch.float32 if kind == FLOAT32 else dtype)
        if kind == PAIR:
            out[key + LO] = out[key]
    return out


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype, layout: Layout = all_low) -> dict[str, torch.Tensor]:
    """The state dict's floating tensors kept as `layout` says (in `dtype`, in float32, or as a pair in `dtype`),
    converted one tensor at a time, each memory-mapped source's pages released once its copy is made. Tensors
    already in their dtype are kept as they are (no copy); `sd` is emptied."""
    want, out, free = _expected(sd, dtype, layout), {}, releaser()
    for key in want:
        out[key] = _converted_tensor(key, sd, dtype, layout)
        if key + LO not in want:  # (a pair's source is done once its second tensor is made)
            source = sd.pop(key if key in sd else key.removesuffix(LO))
            if out[key] is not source:
                free([source])
    return out


def converted(sd: dict[str, torch.Tensor], path: str | os.PathLike, role: str, dtype: torch.dtype,
              layout: Layout = all_low, cache: Path | None = None) -> dict[str, torch.Tensor]:
    """`cast(sd, ...)` of the checkpoint `path` (read as `sd`), or, with a `cache` folder and a conversion to a
    narrower dtype, the converted copy kept there, made now when absent. The copy is only a cache (`caches`): one
    that cannot be read, holds other tensors, is a link, or cannot be written is a logged miss, and this run keeps
    the conversion made in memory."""
    want = _expected(sd, dtype, layout)
    narrowing = any(d != torch.float32 and (k not in sd or sd[k].dtype != d) for k, (_, d) in want.items())
    if cache is None or not narrowing:
        return cast(sd, dtype, layout)
    try:
        if cache.is_symlink():
            raise OSError(f"{cache} is a link, not followed")
        copy = cache / (f"{role}-{file_digest(path, cache)}-{str(dtype).removeprefix('torch.')}-v{FORMAT}"
                        ".safetensors")
    except OSError as e:
        caches.miss(KIND, str(cache), e)
        return cast(sd, dtype, layout)
    kept = _read(copy, want) if os.path.lexists(copy) else None
    if kept is not None:
        with suppress(OSError):  # (its last use: what `_evict` keeps; a read-only cache folder keeps every copy)
            os.utime(copy)
        sd.clear()
        return kept
    kept = _write(copy, sd, dtype, layout, want)
    if kept is None:
        return cast(sd, dtype, layout)
    _evict(copy)
    sd.clear()
    trim_heap()  # (the heap the conversion's temporaries used, back: the model maps the copy)
    return kept


def _write(copy: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype, layout: Layout,
           want: Want) -> dict[str, torch.Tensor] | None:
    """`sd` converted and streamed into a file under a temporary name, read back (its CRC-32 checked), then given
    its final name `copy`; the copy mapped, or None (a logged miss) where any of it fails."""
    tmp = partial_name(copy)
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        remove_partials(copy)
        remove_entry(tmp)  # (a link planted at the temporary name is removed, never written through: O_EXCL)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666),
                       "wb") as f:
            _stream(f, sd, dtype, layout, want)
        if (why := _damage(tmp, want)) is not None:  # (read back unmapped: a mapped file may not be renamed)
            raise OSError(f"the copy read back differs from the tensors written: {why}")
        os.replace(tmp, copy)
    except OSError as e:  # a full disk, a read-only cache folder
        caches.miss(KIND, str(copy.parent), e)
        return None
    finally:
        with suppress(OSError):  # (the folder may not exist: the miss is logged above)
            tmp.unlink(missing_ok=True)
    return _read(copy, want, checked=True)


def _stream(f, sd: dict[str, torch.Tensor], dtype: torch.dtype, layout: Layout, want: Want) -> None:
    """The tensors `want` names written to `f` as a safetensors file, each converted from `sd` just before its
    bytes are written and freed after (the copy is never resident as a whole), each source's pages released
    once converted, and the CRC-32 of the data written into the header's metadata at the end."""
    if sys.byteorder != "little":
        raise OSError("safetensors files are little-endian; this machine is not")
    keys, header, _ = _layout(want)
    f.write(_header(header, "0" * 8))
    crc, free = 0, releaser()
    for key in keys:
        data = _converted_tensor(key, sd, dtype, layout).reshape(-1).view(torch.uint8).numpy()
        f.write(data)
        crc = zlib.crc32(data, crc)
        free([sd[key] if key in sd else sd[key.removesuffix(LO)]])  # (a pair's source: once more, after its lo)
    f.seek(0)
    f.write(_header(header, f"{crc:08x}"))  # (the same length: the data stays where it is)


def _converted_tensor(key: str, sd: dict[str, torch.Tensor], dtype: torch.dtype, layout: Layout) -> torch.Tensor:
    """Tensor `key` of what `layout` keeps of `sd` (a pair's second tensor included), made alone; a tensor already
    in its dtype is the source itself."""
    t = sd.get(key)
    if t is None:  # a pair's second tensor
        return split_pair(sd[key.removesuffix(LO)], dtype)[1]
    kind = layout(key) if t.is_floating_point() else None
    if kind is None:
        return t
    return t.to(dtype if kind in (PAIR, LOW) else torch.float32)


def _layout(want: Want) -> tuple[list[str], dict, int]:
    """The order `_stream` writes `want`'s tensors in (wider dtypes first: every tensor aligned, no gaps between),
    their safetensors header entries, and the data's length in bytes."""
    keys = sorted(want, key=lambda k: -want[k][1].itemsize)
    header, end = {}, 0
    for key in keys:
        shape, dt = want[key]
        if dt not in SAFETENSORS_DTYPES:
            raise OSError(f"a {dt} tensor cannot be kept in a safetensors file")
        size = math.prod(shape) * dt.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(shape), "data_offsets": [end, end + size]}
        end += size
    return keys, header, end


def _header(header: dict, crc: str) -> bytes:
    """A safetensors header: its length (8 bytes, little-endian), then the JSON, padded with spaces to a multiple
    of 8 bytes so the data starts aligned."""
    text = json.dumps({**header, "__metadata__": {"crc32": crc}}, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def _evict(copy: Path) -> None:
    """Delete the copies of `copy`'s model role beyond the KEEP most recently used (`copy` among them) and those of
    other formats: each new checkpoint content adds a copy (about half the file's size). Only files named as
    copies are touched; one in use elsewhere (mapped by another run) stays readable there until it is unmapped."""
    role = copy.name.split("-", 1)[0]
    named = re.compile(rf"{re.escape(role)}-{DIGEST.pattern}-[a-z0-9]+-v[0-9]+\.(pt|safetensors)")
    with suppress(OSError):
        others = [(e.stat(follow_symlinks=False).st_mtime_ns, Path(e.path)) for e in os.scandir(copy.parent)
                  if e.name != copy.name and named.fullmatch(e.name) and not e.is_dir(follow_symlinks=False)]
        current = f"-v{FORMAT}{copy.suffix}"
        kept = [p for _, p in sorted(others, reverse=True) if p.name.endswith(current)][:KEEP - 1]
        for _, old in others:
            if old not in kept:
                with suppress(OSError):
                    old.unlink()


def _damage(copy: Path, want: Want) -> str | None:
    """Why the copy is not the file `_stream` writes for `want`, or None: its header must be that file's, byte for
    byte but for the CRC-32 of the data it carries (so no header is ever parsed here, and no tensor can point at
    another's bytes), its length the data's, and the data must match that CRC; read at file speed (0.2 s for
    CLIP, DINO and SAM's copies)."""
    try:
        _, header, length = _layout(want)
    except OSError as e:
        return str(e)
    template = _header(header, "0" * 8)
    at = template.rindex(b'"crc32":"') + len(b'"crc32":"')
    with open(copy, "rb") as f:
        head = f.read(len(template))
        crc_text = head[at:at + 8]
        if (len(head) < len(template) or re.fullmatch(rb"[0-9a-f]{8}", crc_text) is None
                or head != template[:at] + crc_text + template[at + 8:]):
            return "its header is not the one written for these tensors"
        if os.fstat(f.fileno()).st_size != len(template) + length:
            return "its data is not as long as its tensors"
        crc = 0
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return None if f"{crc:08x}".encode() == crc_text else "its bytes differ from their CRC-32"


def _read(copy: Path, want: Want, checked: bool = False) -> dict[str, torch.Tensor] | None:
    """The cached copy memory-mapped, or None (a logged miss) where it is a link or not a file, cannot be read, was
    damaged since it was written (the CRC-32 of its data; `checked`: just read back by `_write`, not read again),
    or does not hold exactly `want`'s tensors."""
    try:
        if copy.is_symlink() or not copy.is_file():
            raise OSError(f"{copy} is a link or not a file, not followed")
        why = None if checked else _damage(copy, want)
        sd = read_state_dict(copy) if why is None else {}
    except OSError as e:
        caches.miss(KIND, str(copy), e)
        return None
    except (CheckpointError, ValueError, EOFError):  # (no advice to download: a cache)
        why = "not a safetensors file"
    if why is not None:
        caches.miss(KIND, str(copy), f"the copy cannot be read (damaged or cut short: {why})")
        return None
    if sd.keys() == want.keys() and all((tuple(t.shape), t.dtype) == want[k] for k, t in sd.items()):
        return sd
    caches.miss(KIND, str(copy), "the file holds other tensors")
    return None
