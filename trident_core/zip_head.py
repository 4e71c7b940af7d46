"""The first member of an npz read from its local header, which a file cut short keeps (its central directory, at
the end, is the first thing lost): how a damaged npz of ours is told from a file of the user's."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

_LOCAL_HEADER = b"PK\x03\x04"


def leading_array(path: Path, member: str, limit: int = 64 << 10) -> np.ndarray | None:
    """The array stored first in the npz at `path` when that member is `member` (e.g. "run_key.npy"), stored
    uncompressed and whole within the first `limit` bytes; None for anything else."""
    with open(path, "rb") as f:
        head = f.read(limit)
    if len(head) < 30 or head[:4] != _LOCAL_HEADER:
        return None
    (method,) = struct.unpack("<H", head[8:10])
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = 30 + name_len + extra_len
    if method != 0 or head[30:30 + name_len] != member.encode() or start >= len(head):
        return None
    try:
        return np.lib.format.read_array(io.BytesIO(head[start:]), allow_pickle=False)
    except (ValueError, EOFError, OSError):
        return None
