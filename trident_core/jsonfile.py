"""JSON files the package reads back (caches, completion markers, instance lists) parsed as untrusted input: a
size limit, a nesting limit and finite numbers of sane size, so a damaged or hostile file is one ValueError,
never a RecursionError, an OverflowError or a memory blow-up."""

from __future__ import annotations

import json
import os
import stat

MAX_BYTES = 16 << 20  # the largest file we read back (markers of 847 classes are ~60 KB)
MAX_DEPTH = 32  # ours nest at most 4 deep
MAX_INT_DIGITS = 20  # beyond int64: no count, size or time of ours


class JsonFileError(ValueError):
    """A JSON file that cannot be trusted: too large, too deep, not JSON, or with an unreasonable number."""


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, strings skipped (json's own parser recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonFileError(f"number {text[:20]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonFileError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _constant(name: str) -> float:
    raise JsonFileError(f"{name} is not a number")


def parse(text: str) -> object:
    """`text` as JSON within the limits above, or JsonFileError."""
    if len(text) > MAX_BYTES:
        raise JsonFileError(f"{len(text)} characters, more than {MAX_BYTES}")
    if _depth(text) > MAX_DEPTH:
        raise JsonFileError(f"nested more than {MAX_DEPTH} deep")
    try:
        return json.loads(text, parse_float=_float, parse_int=_int, parse_constant=_constant)
    except JsonFileError:
        raise
    except (ValueError, RecursionError, OverflowError) as e:
        raise JsonFileError(f"not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def read(path: str | os.PathLike) -> object:
    """The JSON value of a file (UTF-8) within the limits, or JsonFileError (also for a file that cannot be read:
    missing, a folder, unreadable, too large)."""
    try:  # a pipe or device where the file belongs would block or never end: regular files only
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise JsonFileError(f"{os.fspath(path)} is not a regular file")
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise JsonFileError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from e
    if len(data) > MAX_BYTES:
        raise JsonFileError(f"{os.fspath(path)} is larger than {MAX_BYTES} bytes")
    try:
        return parse(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise JsonFileError(f"{os.fspath(path)} is not UTF-8 text") from e
    except JsonFileError as e:
        raise JsonFileError(f"{os.fspath(path)}: {e}") from e


def read_dict(path: str | os.PathLike) -> dict:
    """A JSON file holding an object, or JsonFileError."""
    value = read(path)
    if not isinstance(value, dict):
        raise JsonFileError(f"{os.fspath(path)} does not hold a JSON object")
    return value
