"""The completion marker `trident.json` of an output folder: the key of the run that made its outputs and the files
that run wrote. It is the proof that a file is ours: nothing is replaced or deleted that a marker does not list,
and a run is taken as complete only when every file the marker lists is still there and reads back."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import jsonfile
from .atomic import write_atomic

MARKER = "trident.json"
LABELS_COLOR, OVERLAY, LABELS, MASKS = "labels_color.png", "overlay.png", "labels.png", "masks"
INSTANCES, INSTANCES_JSON = "instances", "instances.json"  # written with --instances only (instances.py)
OUTPUT_IMAGES = (LABELS_COLOR, OVERLAY, LABELS)  # beside the marker
OUTPUT_FOLDERS = (MASKS, INSTANCES)  # of image files, beside the marker
_NUMBERED_PNG = re.compile(r"\d{3,}_[A-Za-z0-9_-]*\.png")  # masks/NNN_<class>.png, instances/NNN_<class>.png


def is_output_name(name: str) -> bool:
    """Whether `name` (relative, '/'-separated) is a name Trident writes: a marker naming anything else (another
    folder, a user's photo beside the outputs) is not believed."""
    parts = name.split("/")
    if len(parts) == 1:
        return name in (*OUTPUT_IMAGES, INSTANCES_JSON)
    return len(parts) == 2 and parts[0] in OUTPUT_FOLDERS and bool(_NUMBERED_PNG.fullmatch(parts[1]))


@dataclass(frozen=True)
class Marker:
    """A folder's marker as read back: `key` is "" for one written while outputs were being replaced (or
    unreadable); `files` is None for a damaged marker or one from before markers listed their files."""

    key: str
    files: frozenset[str] | None


def read_marker(folder: Path) -> Marker | None:
    """The marker in `folder`, or None when there is none."""
    path = folder / MARKER
    if not os.path.lexists(path):
        return None
    try:
        data = jsonfile.read_dict(path)
    except jsonfile.JsonFileError:
        return Marker("", None)
    key, files = data.get("key"), data.get("files")
    if not (isinstance(files, list) and all(isinstance(f, str) and is_output_name(f) for f in files)):
        files = None
    return Marker(key if isinstance(key, str) else "", None if files is None else frozenset(files))


def write_marker(folder: Path, key: str, settings: dict, files: set[str] | frozenset[str]) -> None:
    """Write the marker atomically: the key ("" = outputs being replaced), the settings and the files written."""
    data = {"key": key, "settings": settings, "files": sorted(files)}
    write_atomic(folder / MARKER, json.dumps(data, indent=1, sort_keys=True).encode())


def is_regular(path: Path) -> bool:
    """A regular file, not a link, folder, pipe or device."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _png_ok(path: Path) -> bool:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.verify()  # every chunk's checksum, to the end of the file
        return True
    except Exception:  # noqa: BLE001 - any way a file fails to read back means "redo it"
        return False


def _instances_ok(folder: Path, files: frozenset[str]) -> bool:
    """instances.json parses and names only mask files the marker lists."""
    try:
        records = jsonfile.read(folder / INSTANCES_JSON)
    except jsonfile.JsonFileError:
        return False
    return isinstance(records, list) and all(isinstance(r, dict) and r.get("mask") in files for r in records)


def file_reads_back(folder: Path, name: str, files: frozenset[str]) -> bool:
    """Whether an output file is a non-empty regular file that parses."""
    path = folder / name
    if not is_regular(path) or path.stat().st_size == 0:
        return False
    if name == INSTANCES_JSON:
        return _instances_ok(folder, files)
    return _png_ok(path)


def complete(folder: Path, key: str, planned: list[str]) -> bool:
    """Whether `folder` holds outputs of the run `key`: its marker has that key, lists every planned file, and each
    listed file is still there, non-empty and readable (outputs deleted or damaged since are redone)."""
    marker = read_marker(folder)
    if marker is None or marker.files is None or not key or marker.key != key or not set(planned) <= marker.files:
        return False
    return all(file_reads_back(folder, name, marker.files) for name in marker.files)
