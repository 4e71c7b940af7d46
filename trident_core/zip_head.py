"""The first member of an npz read from its local header, which a file cut short keeps (its central directory, at
the end, is the first thing lost): how a damaged npz of ours is told from a file of the user's."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

_LOCAL_HEADER = b"PK\x03\x04"


def leading_text(path: Path, member: str, limit: int = 64 << 10) -> str | None:
    """The text stored first in the npz at `path` (a 0-d string array) when that member is `member` (e.g.
    "run_key.npy"), stored uncompressed and whole within the first `limit` bytes; None for anything else."""
    with open(path, "rb") as f:
        head = f.read(limit)
    if len(head) < 30 or head[:4] != _LOCAL_HEADER:
        return None
    (method,) = struct.unpack("<H", head[8:10])
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = 30 + name_len + extra_len
    if method != 0 or head[30:30 + name_len] != member.encode() or start >= len(head):
        return None
    return npy_text(head[start:])


def npy_text(raw: bytes) -> str | None:
    """The text of a .npy holding a 0-d string array (bytes past it ignored), or None for anything else: its
    header is checked before any array is made, so a crafted shape allocates nothing."""
    data = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(data)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            return None
        shape, fortran, dtype = read_header[version](data)
    except (ValueError, EOFError, OSError):
        return None
    if shape != () or dtype.kind != "U" or fortran:
        return None
    text = data.read(dtype.itemsize)
    return str(np.frombuffer(text, dtype)[0]) if len(text) == dtype.itemsize else None
