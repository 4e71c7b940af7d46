"""The images a `segment` run takes: paths, folders, glob patterns and `@list.txt` files, each image named by its
path relative to the inputs' common folder (so equal file names in different folders never collide)."""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .marker import MARKER, OUTPUT_FOLDERS, is_output_name, read_marker, signed_png

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".gif")
_GLOB_CHARS = set("*?[")
logger = logging.getLogger(__name__)


Found = tuple[Path, Path, "str | None"]  # an image, the folder its name is relative to, why it cannot be read


class InputError(ValueError):
    """An input argument that names no image: a missing path, an empty folder, a pattern matching nothing."""


@dataclass(frozen=True)
class ImageJob:
    """One image to segment: its file and its name (path relative to the common folder, '/'-separated)."""

    path: Path
    name: str
    error: str | None = None  # why it cannot be read, known when listing (an unreadable sub-folder)


def _absolute(path: str | os.PathLike) -> Path:
    """The absolute path with `..` resolved, symbolic links kept (the name the user sees)."""
    return Path(os.path.abspath(path))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


class _Outputs:
    """Which files earlier runs wrote: those a completion marker lists (an image's files beside it, its masks/ and
    instances/, a clip's PNG frames under masks/); under a marker that cannot be read (damaged, or from before
    markers listed their files), PNGs with an output's name that carry Trident's signature. Anything else is the
    user's, also beside a marker (e.g. with `--out` the images' folder). Each folder's marker is read once."""

    def __init__(self) -> None:
        self._listed: dict[Path, frozenset[str] | None] = {}

    def __contains__(self, path: Path) -> bool:
        for depth, folder in enumerate(path.parents[:3]):
            if depth and path.parts[-depth - 1] not in OUTPUT_FOLDERS:
                continue
            rel = "/".join(path.parts[-depth - 1:])  # the name the marker of `folder` would list
            listed = self._files(folder)
            ours = (rel in listed) if listed is not None else (is_output_name(rel) and signed_png(path))
            if ours:
                return True
        return False

    def _files(self, folder: Path) -> frozenset[str] | None:
        """The files the marker in `folder` lists (none without a marker), None for one that cannot be read."""
        if folder not in self._listed:
            marker = read_marker(folder) if (folder / MARKER).is_file() else None
            self._listed[folder] = frozenset() if marker is None else marker.files
        return self._listed[folder]


def _walk(folder: Path, unreadable: list[OSError], skip_hidden: bool = True) -> list[Path]:
    """Every file under `folder`, following symbolic links to folders (a dataset linked in) except back into a
    folder on the way to them (a loop), so a folder reached by two ways is searched by both (whichever name the
    user sees for its images is kept later, the first in order); hidden sub-folders are skipped with
    `skip_hidden`, sub-folders that cannot be listed go to `unreadable`."""
    files: list[Path] = []
    stack: list[tuple[Path, frozenset[str]]] = [(folder, frozenset())]
    while stack:
        top, chain = stack.pop()
        real = os.path.realpath(top)
        if real in chain:
            continue
        try:
            with os.scandir(os.fspath(top)) as it:
                entries = list(it)
        except OSError as e:
            unreadable.append(e)
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # (follows links)
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(Path(entry.path))
            elif not (skip_hidden and entry.name.startswith(".")):
                stack.append((Path(entry.path), chain | {real}))
    return files


def _folder_images(folder: Path) -> list[Found]:
    """Image files under `folder` (recursively, sorted, named relative to it), without hidden files and earlier
    runs' outputs; a sub-folder that cannot be listed comes as itself with the reason (reported and counted as
    skipped)."""
    from .video_io import VIDEO_EXTENSIONS

    unreadable: list[OSError] = []
    walked = [p for p in _walk(folder, unreadable) if not _hidden(p, folder)]
    named = sorted(p for p in walked if _is_image(p))
    outputs = _Outputs()
    found = [p for p in named if p.is_file() and p not in outputs]
    odd = [(p, _not_a_file(p)) for p in named if not p.is_file()]  # reported and counted as skipped
    videos = sum(1 for p in walked if p.suffix.lower() in VIDEO_EXTENSIONS and p not in outputs)
    left_out = (f"{videos} video clip(s) there are not images: give each clip as its own command (a folder of "
                "frames as one clip: --video)")
    if not found and not unreadable and not odd:
        raise InputError(f"no images in folder {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files, also in "
                         f"sub-folders); {left_out if videos else 'give a folder that holds images'}")
    if videos:
        logger.warning("%s: %s", folder, left_out)
    _warn_animated(found, str(folder))
    return [(p, folder, None) for p in found] + [(p, folder, why) for p, why in odd] + [
        (_absolute(e.filename), folder, f"cannot list the folder {e.filename} ({e.strerror}): its images are left out")
        for e in unreadable if e.filename and not _hidden(_absolute(e.filename), folder)]


def _not_a_file(path: Path) -> str:
    """Why an entry named like an image is not read: a link to nothing, a pipe, a device, a folder."""
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link (it leads to no file)"
    return f"{path} is not a regular file (a folder, pipe or device): not read"


def _split(pattern: str) -> tuple[Path, tuple[str, ...]]:
    """A pattern's folder part before its first wildcard ("." if none) and the components from there on
    ("photos/*/x.png" -> "photos", ("*", "x.png"))."""
    parts = Path(pattern).parts
    fixed = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    return (Path(*parts[:fixed]) if fixed else Path(".")), parts[fixed:]


def _glob_root(pattern: str) -> Path:
    """The folder part of a pattern before its first wildcard, absolute ("photos/*/x.png" -> "photos")."""
    return _absolute(_split(pattern)[0])


def _glob(pattern: str) -> list[str]:
    """`glob.glob(pattern, recursive=True)`, except that `**` does not follow a link back into a folder on its way
    (glob follows links to folders without end: two links back up made it exponential, a hang with no output)."""
    if "**" not in pattern:
        return glob.glob(pattern, recursive=True)
    root, wanted = _split(pattern)
    return [os.fspath(f) for f in _walk(root, [], skip_hidden=False)
            if _matches(f.relative_to(root).parts, wanted)]


def _matches(names: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether the path components `names` match the glob components `pattern` as glob does: `**` any number of
    components, other wildcards within one (case as the system compares names); hidden names only where the
    pattern's component starts with '.'."""
    if not pattern:
        return not names
    if pattern[0] == "**":
        return any(_matches(names[k:], pattern[1:]) for k in range(len(names) + 1)
                   if not any(n.startswith(".") for n in names[:k]))
    return (bool(names) and (pattern[0].startswith(".") or not names[0].startswith("."))
            and fnmatch.fnmatch(names[0], pattern[0]) and _matches(names[1:], pattern[1:]))


def _glob_images(pattern: str, base: Path | None = None) -> list[Found]:
    """The files a glob pattern matches (earlier runs' outputs left out), each with the pattern's fixed folder
    (`base` when the pattern's own folder part was escaped)."""
    matches_all = sorted(_absolute(m) for m in _glob(pattern) if os.path.isfile(m))
    outputs = _Outputs()
    matches = [m for m in matches_all if _is_image(m) and m not in outputs]
    if not matches:
        from .video_io import is_clip

        clips = sum(1 for m in matches_all if is_clip(m))
        hint = f"; {clips} video clip(s) do: give one clip per command" if clips else ""
        raise InputError(f"no image file matches the pattern {pattern!r} (looked for {', '.join(IMAGE_EXTENSIONS)}"
                         f"{hint})")
    _warn_animated(matches, repr(pattern))
    root = base if base is not None else _glob_root(pattern)
    return [(m, root, None) for m in matches]


def _warn_animated(found: list[Path], where: str) -> None:
    """Say that animated GIF/WebP files among many images are segmented as their first frame (each given alone is
    a clip): they were, without a word."""
    from .video_io import ANIMATED_EXTENSIONS, is_clip

    animated = [p for p in found if p.suffix.lower() in ANIMATED_EXTENSIONS and is_clip(p)]
    if animated:
        logger.warning("%s: %d animated GIF/WebP file(s) (%s%s) are segmented as their first frame only; give each "
                       "as its own command to segment it as a clip", where, len(animated), animated[0].name,
                       ", ..." if len(animated) > 1 else "")


def _list_file(arg: str) -> list[Found]:
    """The images listed in `@FILE`, one per line, relative to the list's folder (blank and '#' lines skipped):
    image paths, folders and glob patterns, each as on the command line."""
    if arg == "@":
        raise InputError("'@' needs a file name after it: @list.txt names a text file listing one image per line")
    path = Path(arg[1:])
    if not path.is_file():
        raise InputError(f"image list {path} not found (an argument starting with @ names a text file listing "
                         "one image path per line)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad) is not part of the first path
    except UnicodeDecodeError as e:
        raise InputError(f"image list {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    lines = [ln.strip() for ln in text.splitlines()]
    base = _absolute(path.parent)
    found = []
    for entry in (ln for ln in lines if ln and not ln.startswith("#")):
        full = _absolute(base / entry)
        pattern = entry if os.path.isabs(entry) else os.path.join(glob.escape(str(base)), entry)
        if full.is_dir():
            found += _folder_images(full)
        elif not full.exists() and _GLOB_CHARS & set(entry) and _glob(pattern):
            found += _glob_images(pattern, base)
        else:  # a file, or a missing one (a pattern matching nothing too): reported when read
            found.append((full, full.parent, None))
    if not found:
        raise InputError(f"image list {path} lists no images (one path per line expected)")
    return found


def gather(inputs: list[str]) -> tuple[list[ImageJob], bool]:
    """The images named by the arguments, in order, without duplicates; and whether it is the single-image form
    (one argument that is an image file), which keeps the flat output layout.

    An argument is `@FILE` (a list of images, folders or patterns, one per line), an existing folder (its images,
    recursively, symbolic links followed), an existing file, or a glob pattern (`*`, `?`, `[`; `**` spans folders).
    A folder's images exclude the outputs of earlier runs written into it. Listed files that do not exist are kept:
    they are reported when read."""
    found: list[Found] = []
    for arg in inputs:
        if arg.startswith("@"):
            found += _list_file(arg)
        elif os.path.isdir(arg):
            found += _folder_images(_absolute(arg))
        elif os.path.isfile(arg):
            found.append((_absolute(arg), _absolute(arg).parent, None))
        elif _GLOB_CHARS & set(arg):
            found += _glob_images(arg)
        elif os.path.exists(arg):
            raise InputError(f"{arg} is not a regular file (a pipe or a device?): give image files, folders, glob "
                             "patterns or @list.txt")
        else:
            raise InputError(f"{arg}: no such image file or folder (give image paths, folders, glob patterns or "
                             "@list.txt)")
    unique = {}  # the first name of each file: one reached twice (a symbolic link, a loop under **) runs once
    for p, _, error in found:
        unique.setdefault(os.path.realpath(p), (p, error))
    try:
        common = Path(os.path.commonpath([str(r) for _, r, _ in found] + [str(p) for p, _, _ in found]))  # (a
        # pattern in a list may reach outside the list's folder: ../shots/*.png)
    except ValueError:  # different drives (Windows): names are the paths without their anchor
        common = None
    jobs = [ImageJob(p, (p.relative_to(common) if common else p.relative_to(p.anchor)).as_posix(), error)
            for p, error in unique.values()]
    single = len(inputs) == 1 and not inputs[0].startswith("@") and os.path.isfile(inputs[0])
    return jobs, single
