"""A checkpoint's tensors in the dtypes a model runs in, without the file's float32 weights resident beside them.

A tensor is kept in the low dtype asked for (bfloat16), in float32, or as a pair of low tensors whose sum is the
float32 value within 2^-16 (`split_pair`: products with both keep a weight matrix's own rounding error out of the
result; models/precision.py). `cast` converts one tensor at a time and releases each memory-mapped source's pages
once its copy is made. With a cache folder (the command line's), a narrowing conversion (float32 -> bfloat16)
is done once per file content: the converted tensors are written there, keyed by the source file's size and
SHA-256, and later runs memory-map that copy (a cache by `caches`' rules: any failure is a logged miss; the KEEP
most recently used copies per model are kept). Its pages are then file-backed like a float32 checkpoint's, so a
stage's weights can be released when it is done (residency.py), and no run after the first converts anything."""

from __future__ import annotations

import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import torch

from .. import caches
from ..atomic import partial_name, remove_entry, remove_partials
from ..checkpoints import CheckpointError, read_state_dict
from ..file_digest import DIGEST, file_digest
from ..residency import release, trim_heap

RELEASE_EVERY = 32 << 20  # bytes of converted sources whose pages are released at once (a release reads smaps)
FORMAT = 1  # of the cached copies: a change of what they hold gives them new names
KEEP = 2  # copies kept per model role, the most recently used: a replaced checkpoint's copy does not stay for good
LOW, FLOAT32, PAIR = "low", "float32", "pair"
LO = "_lo"  # a pair's second tensor is kept under its key + LO
Layout = Callable[[str], str]  # how the floating tensor `key` is kept: LOW (the dtype asked for), FLOAT32, or PAIR
Want = dict[str, tuple[tuple[int, ...], torch.dtype]]  # each tensor's shape and dtype
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
    out, done = {}, _Releaser()
    for key in list(sd):
        t = sd.pop(key)
        kind = layout(key) if t.is_floating_point() else None
        if kind == PAIR:
            out[key], out[key + LO] = split_pair(t, dtype)
        elif kind is not None and t.dtype != (want := torch.float32 if kind == FLOAT32 else dtype):
            out[key] = t.to(want)
        else:
            out[key] = t
            continue
        done.add(t)
    done.flush()
    return out


class _Releaser:
    """Memory-mapped tensors whose pages are released a batch of RELEASE_EVERY bytes at a time."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.pending = 0

    def add(self, t: torch.Tensor) -> None:
        self.tensors.append(t)
        self.pending += t.nbytes
        if self.pending >= RELEASE_EVERY:
            self.flush()

    def flush(self) -> None:
        release(self.tensors)
        self.tensors, self.pending = [], 0


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
        copy = cache / f"{role}-{file_digest(path, cache)}-{str(dtype).removeprefix('torch.')}-v{FORMAT}.pt"
    except OSError as e:
        caches.miss(KIND, str(cache), e)
        return cast(sd, dtype, layout)
    kept = _read(copy, want) if os.path.lexists(copy) else None
    if kept is not None:
        with suppress(OSError):  # (its last use: what `_evict` keeps; a read-only cache folder keeps every copy)
            os.utime(copy)
        return kept
    out = cast(sd, dtype, layout)
    kept = _write(copy, out, want)
    if kept is None:
        return out
    _evict(copy)
    del out
    trim_heap()  # the converted tensors' memory back: the model maps the copy (a first run peaks no higher)
    return kept


def _write(copy: Path, out: dict[str, torch.Tensor], want: Want) -> dict[str, torch.Tensor] | None:
    """`out` written under a temporary name, read back and compared, then given its final name `copy`; the copy
    mapped, or None (a logged miss) where any of it fails."""
    tmp = partial_name(copy)
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        remove_partials(copy)
        remove_entry(tmp)  # (a link planted at the temporary name is removed, never written through: O_EXCL)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666),
                       "wb") as f:
            try:
                torch.save(out, f)
            except RuntimeError as e:  # PyTorch's zip writer reports a full disk so ("unexpected pos ...")
                raise OSError(f"the copy could not be written ({str(e).splitlines()[0] if str(e) else e!r})") from e
        release(out.values())  # the pages of tensors kept as the file had them, read by the saving
        written = _read(tmp, want)
        if written is None or not _equal_released(written, out):
            raise OSError("the copy read back differs from the tensors written")
        del written
        os.replace(tmp, copy)
    except OSError as e:  # a full disk, a read-only cache folder
        caches.miss(KIND, str(copy.parent), e)
        return None
    finally:
        with suppress(OSError):  # (the folder may not exist: the miss is logged above)
            tmp.unlink(missing_ok=True)
    return _read(copy, want)


def _evict(copy: Path) -> None:
    """Delete the copies of `copy`'s model role beyond the KEEP most recently used (`copy` among them) and those of
    other formats: each new checkpoint content adds a copy (about half the file's size). Only files named as
    copies are touched; one in use elsewhere (mapped by another run) stays readable there until it is unmapped."""
    role = copy.name.split("-", 1)[0]
    named = re.compile(rf"{re.escape(role)}-{DIGEST.pattern}-[a-z0-9]+-v[0-9]+\.pt")
    with suppress(OSError):
        others = [(e.stat(follow_symlinks=False).st_mtime_ns, Path(e.path)) for e in os.scandir(copy.parent)
                  if e.name != copy.name and named.fullmatch(e.name) and not e.is_dir(follow_symlinks=False)]
        kept = [p for _, p in sorted(others, reverse=True) if p.name.endswith(f"-v{FORMAT}.pt")][:KEEP - 1]
        for _, old in others:
            if old not in kept:
                with suppress(OSError):
                    old.unlink()


def _equal_released(written: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor read back equals the one written, compared one at a time and the pages of both
    released after (memory-mapped ones: the copy, and tensors kept as the source file had them), so the copy is
    never resident beside the converted tensors."""
    done = _Releaser()
    for key, t in out.items():
        if not torch.equal(written[key], t):
            return False
        done.add(written[key])
        done.add(t)
    done.flush()
    return True


def _damage(copy: Path) -> str | None:
    """Why the copy's bytes are not those written, or None: torch.save's zip records each carry the CRC-32 of
    their bytes (stored uncompressed), checked here at file-read speed (0.2 s for CLIP, DINO and SAM's copies)."""
    with zipfile.ZipFile(copy) as z, open(copy, "rb") as f:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                return f"{info.filename} is compressed"
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                return f"{info.filename}: no record header"
            f.seek(info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30])))
            crc, left = 0, info.compress_size
            while left:
                block = f.read(min(left, 1 << 22))
                if not block:
                    return f"{info.filename} is cut short"
                crc, left = zlib.crc32(block, crc), left - len(block)
            if crc != info.CRC:
                return f"{info.filename}: its bytes differ from their CRC-32"
    return None


def _plain(sd: dict[str, torch.Tensor], copy: Path) -> bool:
    """Whether every tensor is an ordinary dense one and the storages are the file's records byte for byte (a
    record shorter than its tensor PyTorch's reader refuses itself)."""
    storages = {}
    for t in sd.values():
        if t.layout != torch.strided or not t.is_contiguous():
            return False
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    with zipfile.ZipFile(copy) as z:
        records = sum(i.file_size for i in z.infolist() if re.search(r"/data/[0-9]+$", i.filename))
    return sum(storages.values()) == records


def _read(copy: Path, want: Want) -> dict[str, torch.Tensor] | None:
    """The cached copy memory-mapped, or None (a logged miss) where it is a link or not a file, cannot be read, was
    damaged since it was written (its records' CRC-32), or does not hold exactly `want`'s tensors, plain ones."""
    try:
        if copy.is_symlink() or not copy.is_file():
            raise OSError(f"{copy} is a link or not a file, not followed")
        why = _damage(copy)
        sd = read_state_dict(copy) if why is None else {}
    except OSError as e:
        caches.miss(KIND, str(copy), e)
        return None
    except (CheckpointError, zipfile.BadZipFile, ValueError, EOFError):  # (no advice to download: a cache)
        why = "not a file of plain tensors"
    if why is not None:
        caches.miss(KIND, str(copy), f"the copy cannot be read (damaged or cut short: {why})")
        return None
    if (sd.keys() == want.keys() and all((tuple(t.shape), t.dtype) == want[k] for k, t in sd.items())
            and _plain(sd, copy)):
        return sd
    caches.miss(KIND, str(copy), "the file holds other tensors")
    return None
