"""Check output paths before any computing, so a bad --out fails in one line at once, not after the work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _require_writable_folder(folder: Path, what: str, given: Path) -> None:
    """Create `folder` if needed and write a probe file in it; one clear error when either fails."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"{what} {given}: {blocker} is a file, not a folder; give a folder path or remove that file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {given}: the folder {folder} cannot be written ({exc.strerror or exc}); give a "
                         "folder you can write to") from exc


def require_output_folder(folder: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output folder that names an existing file or cannot be created or written (creating it)."""
    _require_writable_folder(Path(folder), what, Path(folder))


def require_output_file(file: str | os.PathLike, what: str = "--out", example: str = "result.json") -> None:
    """Refuse an output file that names an existing folder or whose folder cannot be created or written."""
    path = Path(file)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name, e.g. {path / example}")
    _require_writable_folder(path.parent, what, path)
