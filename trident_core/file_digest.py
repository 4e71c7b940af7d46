"""What identifies a model file: its content (size and SHA-256), not its path, size and modification time.

Hashing a 600 MB checkpoint takes a second or two, so the digest is remembered per path in a small JSON memo. A
remembered digest is reused only while the file's size, modification time, inode and status-change time are those
it was hashed with and a hash of sampled blocks (header, tail and 16 blocks between) still matches: a file
replaced by other weights of the same size and time (as `cp -p` and `rsync -a` restore) is hashed again."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from . import caches, jsonfile
from .atomic import write_atomic

HASHES = "file-hashes.json"
EDGE = 1 << 20  # bytes sampled at each end (headers live there)
BLOCK = 1 << 16  # bytes of each sampled block between
BLOCKS = 16
DIGEST = re.compile(r"[0-9]+-[0-9a-f]{64}")  # "<size>-<sha256>": names files, so nothing else is trusted
_memo: dict[str, dict] = {}  # this process's entries, by absolute path


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def sampled_hash(path: str | os.PathLike, size: int) -> str:
    """SHA-256 of the file's first and last EDGE bytes and BLOCKS evenly spaced blocks (reads at most ~3 MB)."""
    h = hashlib.sha256(str(size).encode())
    offsets = [0, max(0, size - EDGE)] + [size * (i + 1) // (BLOCKS + 1) for i in range(BLOCKS)]
    with open(path, "rb") as f:
        for i, offset in enumerate(offsets):
            f.seek(offset)
            h.update(f.read(EDGE if i < 2 else BLOCK))
    return h.hexdigest()


def full_digest(path: str | os.PathLike) -> str:
    """"<size>-<sha256>" of the whole file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            size += len(block)
    return f"{size}-{h.hexdigest()}"


def _valid(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("stat"), list) and len(entry["stat"]) == 4
            and all(isinstance(v, int) for v in entry["stat"]) and isinstance(entry.get("sample"), str)
            and isinstance(entry.get("digest"), str) and DIGEST.fullmatch(entry["digest"]) is not None)


def _read_memo(path: Path) -> dict:
    """The remembered digests ({} when absent; a damaged memo is a logged miss)."""
    if not os.path.lexists(path):
        return {}
    try:
        return jsonfile.read_dict(path)
    except jsonfile.JsonFileError as e:
        caches.miss("model file digests", str(path), e)
        return {}


def file_digest(path: str | os.PathLike, memo_folder: Path) -> str:
    """"<size>-<sha256>" of a file, taken from the memo when the file provably did not change since, else hashed
    (and remembered in `memo_folder`/file-hashes.json when that can be written)."""
    full = os.path.abspath(path)
    st = os.stat(full)
    stat = _stat_key(st)
    sample = sampled_hash(full, st.st_size)
    entry = _memo.get(full)
    memo_file = memo_folder / HASHES
    known = None
    if entry is None:
        known = _read_memo(memo_file)
        entry = known.get(full)
    if _valid(entry) and entry["stat"] == stat and entry["sample"] == sample:
        _memo[full] = entry
        return entry["digest"]
    entry = {"stat": stat, "sample": sample, "digest": full_digest(full)}
    _memo[full] = entry
    known = _read_memo(memo_file) if known is None else known
    known[full] = entry
    try:
        write_atomic(memo_file, json.dumps(known, indent=1, sort_keys=True).encode())
    except OSError as e:
        caches.miss("model file digests", str(memo_file), e)
    return entry["digest"]


def forget() -> None:
    """Drop this process's remembered digests (tests: a new process)."""
    _memo.clear()
