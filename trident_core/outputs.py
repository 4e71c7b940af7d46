"""The files of one segmentation: colour label map, overlay, label indices, one mask per class, and the npz.

They are written under temporary names and moved to their final ones when complete, with a completion marker
(`trident.json`, marker.py: the key of the settings that made them and the files written) last, so an interrupted
run never leaves a half-written output under its final name, a later run knows which outputs are complete, and
nothing is replaced or deleted that a marker does not list."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import jsonfile
from .atomic import atomic_file, folder_lock, fresh_folder, partial_name, remove_partials, replace_folder
from .marker import (
    INSTANCES_JSON,
    LABELS,
    LABELS_COLOR,
    MARKER,
    MARKER_START,
    MASKS,
    OVERLAY,
    SIGNATURE,
    Marker,
    file_part,
    is_regular,
    read_marker,
    sha256_of,
    signed_png,
    write_marker,
)
from .zip_head import leading_text, npy_text

OVERLAY_PNG_LEVEL = 1  # zlib level of the photo-like overlay: 2.6x faster to write than PIL's 6, 15 % larger


class OutputConflict(ValueError):
    """An output would replace a file Trident cannot prove it wrote (a user's file, an input image)."""


def save_png(pixels: np.ndarray, path: Path, compress_level: int = 6) -> None:
    """A PNG of ours: it carries Trident's text chunk, which shows it is ours where a damaged marker cannot."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(*SIGNATURE)
    Image.fromarray(pixels).save(path, format="PNG", pnginfo=info, compress_level=compress_level)


def numbered(i: int, count: int, name: str, ext: str = ".png") -> str:
    """`NNN_<name>.png` for item i of `count`: numbers zero-padded to one width (at least 3) so names sort in order."""
    return f"{i:0{max(3, len(str(count - 1)))}d}_{file_part(name)}{ext}"


def planned_files(names: list[str], instances: bool = False) -> list[str]:
    """The files (relative, '/'-separated) an image's outputs always hold for these class names; with --instances
    also instances.json (its object masks are counted when found)."""
    masks = [f"{MASKS}/{numbered(i, len(names), n)}" for i, n in enumerate(names)]
    return [LABELS_COLOR, OVERLAY, LABELS, *masks, *([INSTANCES_JSON] if instances else [])]


def write_images(seg, image: np.ndarray, folder: Path) -> None:
    """labels_color.png (with a legend), overlay.png, labels.png and masks/NNN_<class>.png into `folder`."""
    from .render import color_labels, legend, overlay

    folder.mkdir(parents=True, exist_ok=True)
    names = seg.classes.names
    colors = color_labels(seg.labels, len(names))
    save_png(np.concatenate([colors, legend(names, colors.shape[1])]), folder / LABELS_COLOR)
    save_png(overlay(image, colors), folder / OVERLAY, OVERLAY_PNG_LEVEL)
    save_png(seg.labels.clamp(min=0).cpu().numpy().astype(np.uint16 if len(names) > 255 else np.uint8),
             folder / LABELS)
    masks = folder / MASKS
    masks.mkdir(exist_ok=True)
    lab = seg.labels.cpu().numpy()
    for i, name in enumerate(names):
        save_png(((lab == i) * 255).astype(np.uint8), masks / numbered(i, len(names), name))


@dataclass(frozen=True)
class Blocks:
    """An array given block by block along its first axis (`write_npz` writes it without ever holding it whole)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[], Iterator[np.ndarray]]


def npz_arrays(seg) -> dict[str, Callable[[], np.ndarray | Blocks]]:
    """logits (raw cosine, queries x H x W), probs, labels, class_names (+ labels_coarse/probs_coarse when refined);
    `pred`/`pred_coarse` repeat the label maps under the reference harness's names. Each array is made when asked
    (`write_npz` writes one at a time); the full-resolution logits one query at a time (bilinear upsampling is per
    channel: the values of `seg.logits()` without its [Q, H, W] tensor, 240 MB for context59 at 1024x1024)."""

    from .classify import upsample

    def f32(t) -> np.ndarray:
        return t.cpu().numpy().astype(np.float32, copy=False)  # (a float32 map's own memory: no copy)

    grid = seg.grid_logits
    logits = Blocks((grid.shape[0], *seg.image_size), np.dtype(np.float32),
                    lambda: (f32(upsample(grid[q:q + 1], seg.image_size)) for q in range(grid.shape[0])))
    arrays = {"logits": lambda: logits, "probs": lambda: f32(seg.probs),
              "labels": lambda: seg.labels.cpu().numpy().astype(np.int32),
              "class_names": lambda: np.array(seg.classes.names), "query_words": lambda: np.array(seg.classes.queries),
              "query_idx": lambda: np.array(seg.classes.query_class)}
    if seg.refined:
        arrays["labels_coarse"] = lambda: seg.labels_coarse.cpu().numpy().astype(np.int32)
        arrays["probs_coarse"] = lambda: f32(seg.probs_coarse)
        arrays["pred_coarse"] = arrays["labels_coarse"]
    arrays["pred"] = arrays["labels"]  # the reference harness's names for the label maps
    return arrays


def write_npz(f, arrays: dict[str, Callable[[], np.ndarray | Blocks]]) -> None:
    """What `np.savez(f, **arrays)` writes (an uncompressed zip of NAME.npy members), the arrays made and written
    one at a time (`Blocks` block by block)."""
    import zipfile

    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, make in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                _write_npy(member, make())  # (no reference kept: the next array is made once this one is gone)


def _write_npy(member, array: np.ndarray | Blocks) -> None:
    """The .npy of `array`; of `Blocks`, numpy's header and then each block's bytes in order (C order, as
    `write_array` writes them)."""
    if not isinstance(array, Blocks):
        array = np.asanyarray(array)
        if array.dtype.kind in "biuf" and array.flags.c_contiguous:  # (from its own memory: numpy copies in chunks)
            np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
            member.write(array.data)
        else:
            np.lib.format.write_array(member, array, allow_pickle=False)
        return
    np.lib.format.write_array_header_1_0(member, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                                  "fortran_order": False, "shape": array.shape})
    rows = 0
    for block in array.blocks():
        if block.shape[1:] != array.shape[1:]:
            raise ValueError(f"a block of shape {block.shape} in an array of shape {array.shape}")
        member.write(np.ascontiguousarray(block, array.dtype).data)
        rows += block.shape[0]
    if rows != array.shape[0]:
        raise ValueError(f"{rows} rows written of an array of shape {array.shape}")


NPZ_ARRAYS = ("logits", "probs", "labels", "class_names", "run_key")  # what every npz of a run holds


def save_npz(seg, path: str | os.PathLike, key: str | None = None, protected: frozenset[str] = frozenset()) -> None:
    """The npz of `npz_arrays`, written atomically; with `key` (a run's), also `run_key` (what `npz_complete`
    checks), and a file already at `path` is replaced only if it is an npz of ours (one holding a run_key) and
    not one of the `protected` paths (the inputs)."""
    arrays = npz_arrays(seg)
    path = Path(path)
    if key is not None:  # the key first: what is left of a file cut short still proves it ours
        arrays = {"run_key": lambda: np.array(key), **arrays}
        check_npz_replaceable(path, protected)
    remove_partials(path)
    with atomic_file(path) as f:
        write_npz(f, arrays)


def _npz_run_key(path: Path) -> str | None:
    """The run_key of an npz written by a run (None for anything else: another npz, a damaged file), read without
    trusting the file: a run_key member larger than a key is not one (a small compressed file can unpack to GBs)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("run_key.npy")
            if info.file_size > 1024:
                return None
            return npy_text(zf.read(info))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def _replaceable_npz(path: Path) -> bool:
    """An npz a run wrote (it holds a run_key), or what is left of one cut short or damaged: its first member, the
    run key a run writes first, still in place. Anything else (an empty file, another zip, a checkpoint half
    downloaded, a readable npz of someone else's) is not ours to replace."""
    if not is_regular(path):
        return False
    return _npz_run_key(path) is not None or leading_text(path, "run_key.npy", 4096) is not None


def check_npz_replaceable(path: Path, protected: frozenset[str] = frozenset()) -> None:
    """Refuse to write an npz over an input image or over a file that is not an npz Trident wrote."""
    if os.path.realpath(path) in protected:
        raise OutputConflict(f"--save-npz {path} is one of the input images: choose another file name")
    if os.path.lexists(path) and not _replaceable_npz(path):
        raise OutputConflict(f"--save-npz {path}: a file Trident did not write is there; move it away or choose "
                             "another file name")


def npz_complete(path: Path, key: str) -> bool:
    """Whether `path` is a whole npz written by `save_npz` with this key: stored uncompressed as np.savez writes
    it (nothing to unpack), every member reading back with its checksum (a truncated or damaged file counts as
    incomplete)."""
    import zipfile

    if not is_regular(path) or _npz_run_key(path) != key:
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
            stored = all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())  # as np.savez writes
            return set(NPZ_ARRAYS) <= names and stored and zf.testzip() is None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


Extra = Callable[[object, np.ndarray, Path], None]
"""More files of one segmentation written beside the images (e.g. its objects), into the same temporary folder."""


def _tree(folder: Path) -> tuple[set[str], set[str]]:
    """Under `folder`, relative and '/'-separated: every entry that is not a folder (files, links, pipes; links to
    folders are entries, not followed) and every sub-folder."""
    files, folders = set(), set()
    for top, dirs, names in os.walk(folder):
        rel = Path(top).relative_to(folder)
        linked = [d for d in dirs if os.path.islink(Path(top) / d)]
        files |= {(rel / n).as_posix() for n in names + linked}
        folders |= {(rel / d).as_posix() for d in dirs if d not in linked}
    return files, folders


def _files(folder: Path) -> set[str]:
    """Every entry under `folder` that is not a folder (`_tree`)."""
    return _tree(folder)[0]


def _all_ours(folder: Path, marker: Marker | None, protected: frozenset[str]) -> bool:
    """Whether everything in the existing folder is provably ours (its marker lists it; a sub-folder holds a file
    it lists, so no empty folder of the user's is there) and holds no input, so the whole folder may be replaced
    at once."""
    if marker is None or marker.files is None:
        return False
    entries, folders = _tree(folder)
    ours = {parent.as_posix() for name in marker.files for parent in Path(name).parents if parent.parts}
    real = os.path.realpath(folder) + os.sep
    return (entries <= marker.files | {MARKER} and folders <= ours
            and not any(p.startswith(real) for p in protected))


def _check_free(final: Path, name: str, marker: Marker | None, protected: frozenset[str]) -> None:
    """Refuse to put output `name` into `final` where it would replace an input or anything we cannot prove ours:
    a file is ours when the folder's marker lists it, or (the marker being damaged) it is a PNG carrying our
    signature; a linked sub-folder is never written through."""
    dest = final / name
    if os.path.realpath(dest) in protected:
        raise OutputConflict(f"the output {dest} would replace the input image {os.path.realpath(dest)}: choose "
                             "another --out")
    _check_folder(final, Path(name).parent)
    if not os.path.lexists(dest):
        return
    listed = marker is not None and marker.files is not None and name in marker.files
    ours = listed or (marker is not None and marker.files is None and signed_png(dest))
    if not (is_regular(dest) and ours):
        raise OutputConflict(f"{dest} is not a file Trident wrote (no {MARKER} there lists it): move it away or "
                             "choose another --out")


def _check_folder(final: Path, folder: Path) -> None:
    """Refuse outputs in `folder` (below `final`) where it, or a folder above it, is a file or a link."""
    linked = _not_a_folder(final, folder)
    if linked is not None:
        raise OutputConflict(f"{linked} is not a folder Trident wrote (a file or a link): move it away or choose "
                             "another --out")


def _not_a_folder(final: Path, folder: Path) -> Path | None:
    """The first of the folders from `final` down to `folder` (relative to it) that is a link or not a folder (never
    written or deleted through, whatever its depth), or None."""
    for parent in [*reversed(folder.parents[:-1]), folder] if folder.parts else []:
        if (final / parent).is_symlink() or (os.path.lexists(final / parent) and not (final / parent).is_dir()):
            return final / parent
    return None


def check_marker_replaceable(folder: Path) -> None:
    """Refuse a `trident.json` in `folder` that is not a marker of ours: a link, a folder, a pipe, a JSON file of
    the user's (one without a marker's "key" and "files") or any other file. A marker that no longer parses is
    ours, damaged, only where it still begins as every marker does."""
    path = folder / MARKER
    if not os.path.lexists(path):
        return
    if not is_regular(path):
        raise OutputConflict(f"{path} is not a file Trident wrote (a link, folder or pipe): move it away or choose "
                             "another --out")
    try:
        data = jsonfile.read(path)
    except jsonfile.JsonFileError:
        with open(path, "rb") as f:
            data = {"key": "", "files": []} if f.read(len(MARKER_START)) == MARKER_START else None
    if not (isinstance(data, dict) and {"key", "files"} <= data.keys()):
        raise OutputConflict(f"{path} is not a marker Trident wrote (a file of yours?): move it away or choose "
                             "another --out")


def _move_in(tmp: Path, final: Path, name: str) -> None:
    """Move one finished file into place (its sub-folder made if needed)."""
    (final / name).parent.mkdir(exist_ok=True)
    os.replace(tmp / name, final / name)


def place_outputs(tmp: Path, final: Path, key: str, settings: dict, protected: frozenset[str]) -> None:
    """Move the finished files of `tmp` into the existing folder `final` one by one, each complete under its
    name; remove the files the folder's previous marker listed that this run did not write, but for the
    `protected` inputs; nothing else in `final` is touched. The marker lists every file that may be ours at each
    moment and gets the key last."""
    with folder_lock(final):  # (another run writing into the same folder waits)
        remove_partials(final / MARKER)
        check_marker_replaceable(final)
        marker = read_marker(final)
        new = _files(tmp)
        for name in sorted(new):
            _check_free(final, name, marker, protected)
        digests = {name: sha256_of(tmp / name) for name in new}
        old = marker.files if marker is not None and marker.files is not None else frozenset()
        write_marker(final, "", settings, old | new)  # incomplete from here on, yet every file listed is ours
        for name in sorted(new):
            _move_in(tmp, final, name)
        for name in sorted(old - new):  # (never an input: a rerun given an earlier output deleted it)
            if (is_regular(final / name) and _not_a_folder(final, Path(name).parent) is None
                    and os.path.realpath(final / name) not in protected):
                (final / name).unlink()
        for sub in sorted({parent for name in old - new for parent in Path(name).parents if parent.parts},
                          key=lambda p: -len(p.parts)):  # sub-folders left empty, the deepest first
            if (final / sub).is_dir() and _not_a_folder(final, sub) is None and not any((final / sub).iterdir()):
                (final / sub).rmdir()
        write_marker(final, key, settings, new, digests)


def _write_all(seg, image: np.ndarray, tmp: Path, extra: Extra | None) -> None:
    write_images(seg, image, tmp)
    if extra is not None:
        extra(seg, image, tmp)


def save_folder(seg, image: np.ndarray, final: Path, key: str, settings: dict, extra: Extra | None = None,
                protected: frozenset[str] = frozenset()) -> None:
    """An image's own output folder. New, or holding only files its marker lists: written complete (marker
    included) under a temporary name, then renamed over it. Otherwise (files Trident did not write are there)
    the outputs are put into it one by one, the other files left as they are."""
    if final.is_symlink() and final.is_dir():
        final = Path(os.path.realpath(final))  # a linked output folder: its target is replaced, the link stays
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(final)
    tmp = fresh_folder(partial_name(final))
    try:
        _write_all(seg, image, tmp, extra)
        with folder_lock(final.parent):
            if final.is_dir():
                remove_partials(final / MARKER)
            marker = read_marker(final) if final.is_dir() else None
            whole = not os.path.lexists(final) or (final.is_dir() and _all_ours(final, marker, protected))
            if whole:
                files = _files(tmp)
                write_marker(tmp, key, settings, files, {name: sha256_of(tmp / name) for name in files})
                replace_folder(tmp, final)
            else:
                place_outputs(tmp, final, key, settings, protected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_flat(seg, image: np.ndarray, out: Path, key: str, settings: dict, extra: Extra | None = None,
              protected: frozenset[str] = frozenset()) -> None:
    """The single-image layout: the files directly in `out` (a folder that may hold other things of the user's,
    which stay as they are), each moved in complete, the marker written last."""
    remove_partials(out / "outputs")
    tmp = fresh_folder(partial_name(out / "outputs"))
    try:
        _write_all(seg, image, tmp, extra)
        place_outputs(tmp, out, key, settings, protected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_planned(final: Path, planned: list[str], protected: frozenset[str], folders: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, outputs that would land on an input image or on a file Trident did not write, and
    `folders` (whose files are named once found, e.g. a clip's objects) that are files or links."""
    if not final.is_dir():
        return
    check_marker_replaceable(final)
    marker = read_marker(final)
    for name in planned:
        _check_free(final, name, marker, protected)
    for folder in folders:
        _check_folder(final, Path(folder))
