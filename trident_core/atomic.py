"""Files and folders that appear under their final name only when complete (temporary name, then os.replace)."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

NAME_MAX = 255  # bytes in a file name on common file systems


def _stem(path: Path) -> str:
    """`path`'s name in its temporary names; a name too long to take the suffix is shortened, with a hash of it."""
    name = path.name
    if len(os.fsencode(f".{name}.partial-4294967295-old")) <= NAME_MAX:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return f"{name[:80]}~{digest}"


TEMPORARY = re.compile(r"\..+\.partial-\d+(-old)?")
"""The temporary names of `partial_name` (and replace_folder's "-old"): hidden, ending in our process number."""


def partial_name(path: Path) -> Path:
    """This process's temporary name beside `path` (hidden, never taken for a finished output)."""
    return path.with_name(f".{_stem(path)}.partial-{os.getpid()}")


def _running(pid: int) -> bool:
    """Whether another process `pid` runs on this machine (its temporary files are in use, not left over)."""
    if pid == os.getpid():
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl+C there
        return _running_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # another user's process, or a pid this system cannot check: leave its files alone
    return True


def _running_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # access denied: it exists
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def remove_partials(path: Path) -> None:
    """Delete what interrupted runs left beside `path` under temporary names (those of a process still running,
    e.g. another run writing into the same folder, are left to it)."""
    for leftover in glob.glob(glob.escape(str(path.parent / f".{_stem(path)}.")) + "partial-*"):
        pid = re.match(r"(\d+)", leftover.rsplit(".partial-", 1)[1])
        if pid and _running(int(pid.group(1))):
            continue
        remove_entry(Path(leftover))


def remove_entry(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def fresh_folder(path: Path) -> Path:
    """Create `path` as a new, empty folder of ours (whatever was at that temporary name is removed first, a link
    planted there included, so nothing is written through it)."""
    remove_entry(path)
    path.mkdir()
    return path


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write to a temporary file beside `path` and `os.replace` it over `path` once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    remove_entry(tmp)  # (a link planted at this name is removed, never written through: O_EXCL below)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    with atomic_file(path) as f:
        f.write(data)


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final`; a folder already there is moved aside first and then deleted,
    so `final` is at every moment either the old complete folder or the new one (or briefly absent). Anything
    but a folder at `final` (an input image, say) is never replaced."""
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} is a file, not an output folder: choose another --out")
    old = partial_name(final).with_name(partial_name(final).name + "-old")
    for attempt in range(3):  # another run may be replacing the same folder at this moment
        try:
            if final.exists():
                remove_entry(old)  # (this run's own, from a try the other run overtook)
                os.replace(final, old)
            os.replace(tmp, final)
            break
        except OSError:
            if attempt == 2:
                raise
    remove_entry(old)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (flock on the folder itself: no file is added to it) while several of its
    entries change together, so two runs writing into one folder take turns (a no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
