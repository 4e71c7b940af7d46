"""The completion marker `trident.json` of an output folder: the key of the run that made its outputs and the files
that run wrote. It is the proof that a file is ours: nothing is replaced or deleted that a marker does not list,
and a run is taken as complete only when every file the marker lists is still there and reads back."""

from __future__ import annotations

import hashlib
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
OVERLAY_VIDEO, TRACKS_JSON, TRACKS_VIDEO = "overlay.mp4", "tracks.json", "tracks.mp4"  # a clip's (video_run.py)
OUTPUT_IMAGES = (LABELS_COLOR, OVERLAY, LABELS)  # beside the marker
OUTPUT_FOLDERS = (MASKS, INSTANCES)  # of numbered files, beside the marker
_NUMBERED = re.compile(r"(\d{3,})_(.*)\.(png|mp4)", re.DOTALL)  # masks/NNN_<class>.png or .mp4, instances/ alike
_FRAME_PNG = re.compile(r"\d{6,}\.png")  # a clip's PNG frames: masks/NNN_<class>/000000.png
MARKER_START = b'{\n "files": ['  # how every marker begins (sorted keys, "files" first): a damaged one still does
SIGNATURE = ("Software", "ComfyUI-Trident")  # a text chunk in every PNG we write


def file_part(name: str) -> str:
    """A class name as part of a file name: letters, digits, '-' and '_' kept, others '_', at most 60 characters."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]


def is_output_name(name: str) -> bool:
    """Whether `name` (relative, '/'-separated) is a name Trident writes: a marker naming anything else (another
    folder, a user's photo beside the outputs) is not believed."""
    parts = name.split("/")
    if len(parts) == 1:
        return name in (*OUTPUT_IMAGES, INSTANCES_JSON, OVERLAY_VIDEO, TRACKS_JSON, TRACKS_VIDEO)
    if parts[0] not in OUTPUT_FOLDERS or len(parts) > 3:
        return False
    numbered = _NUMBERED.fullmatch(parts[1] if len(parts) == 2 else parts[1] + ".png")
    frame = len(parts) == 2 or _FRAME_PNG.fullmatch(parts[2]) is not None
    return numbered is not None and file_part(numbered[2]) == numbered[2] and frame


@dataclass(frozen=True)
class Marker:
    """A folder's marker as read back: `key` is "" for one written while outputs were being replaced (or
    unreadable); `files` is None for a damaged marker or one from before markers listed their files; `digests`
    (SHA-256 per file, of a complete run) is what resume checks the files against."""

    key: str
    files: frozenset[str] | None
    digests: dict[str, str] | None = None


def read_marker(folder: Path) -> Marker | None:
    """The marker in `folder`, or None when there is none."""
    path = folder / MARKER
    if not os.path.lexists(path):
        return None
    try:
        data = jsonfile.read_dict(path)
    except jsonfile.JsonFileError:
        return Marker("", None)
    key, files, digests = data.get("key"), data.get("files"), data.get("sha256")
    if not (isinstance(files, list) and all(isinstance(f, str) and is_output_name(f) for f in files)):
        return Marker("", None)
    if not (isinstance(digests, dict) and set(digests) == set(files)
            and all(isinstance(d, str) and len(d) == 64 for d in digests.values())):
        digests = None
    return Marker(key if isinstance(key, str) else "", frozenset(files), digests)


def write_marker(folder: Path, key: str, settings: dict, files: set[str] | frozenset[str],
                 digests: dict[str, str] | None = None) -> None:
    """Write the marker atomically: the key ("" = outputs being replaced), the settings, the files written and,
    for a complete run, their SHA-256."""
    data = {"key": key, "settings": settings, "files": sorted(files), **({"sha256": digests} if digests else {})}
    write_atomic(folder / MARKER, json.dumps(data, indent=1, sort_keys=True).encode())


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def signed_png(path: Path) -> bool:
    """Whether `path` is a PNG Trident wrote (it carries our text chunk), read from its first chunks only."""
    from PIL import Image

    if not is_regular(path):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.format == "PNG" and im.info.get(SIGNATURE[0]) == SIGNATURE[1]
    except Exception:  # noqa: BLE001 - any file that does not read as our PNG is not ours
        return False


def is_regular(path: Path) -> bool:
    """A regular file, not a link, folder, pipe or device."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def complete(folder: Path, key: str, planned: list[str]) -> bool:
    """Whether `folder` holds outputs of the run `key`: its marker has that key, lists every planned file, and each
    listed file is still there with the content it was written with (outputs deleted, emptied, damaged or replaced
    since are redone)."""
    marker = read_marker(folder)
    if (marker is None or marker.files is None or marker.digests is None or not key or marker.key != key
            or not set(planned) <= marker.files):
        return False
    return all(is_regular(folder / name) and sha256_of(folder / name) == digest
               for name, digest in marker.digests.items())
