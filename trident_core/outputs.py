"""The files of one segmentation: colour label map, overlay, label indices, one mask per class, and the npz.

They are written under temporary names and moved to their final ones when complete, with a completion marker
(`trident.json`, holding the key of the settings that made them) last, so an interrupted run never leaves a
half-written output under its final name and a later run knows which outputs are complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic import atomic_file, partial_name, remove_partials, replace_folder, write_atomic

MARKER = "trident.json"
LABELS_COLOR, OVERLAY, LABELS, MASKS = "labels_color.png", "overlay.png", "labels.png", "masks"
INSTANCES, INSTANCES_JSON = "instances", "instances.json"  # written with --instances only (instances.py)
OUTPUT_IMAGES = (LABELS_COLOR, OVERLAY, LABELS)  # beside the marker
OUTPUT_FOLDERS = (MASKS, INSTANCES)  # of image files, beside the marker
OPTIONAL_OUTPUTS = (INSTANCES, INSTANCES_JSON)
OVERLAY_PNG_LEVEL = 1  # zlib level of the photo-like overlay: 2.6x faster to write than PIL's 6, 15 % larger


def file_part(name: str) -> str:
    """A class name as part of a file name: letters, digits, '-' and '_' kept, others '_', at most 60 characters."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]


def write_images(seg, image: np.ndarray, folder: Path) -> None:
    """labels_color.png (with a legend), overlay.png, labels.png and masks/NNN_<class>.png into `folder`."""
    from PIL import Image

    from .render import color_labels, legend, overlay

    folder.mkdir(parents=True, exist_ok=True)
    names = seg.classes.names
    colors = color_labels(seg.labels, len(names))
    Image.fromarray(np.concatenate([colors, legend(names, colors.shape[1])])).save(folder / LABELS_COLOR)
    Image.fromarray(overlay(image, colors)).save(folder / OVERLAY, compress_level=OVERLAY_PNG_LEVEL)
    Image.fromarray(seg.labels.clamp(min=0).cpu().numpy().astype(np.uint16 if len(names) > 255 else np.uint8)).save(
        folder / LABELS)
    masks = folder / MASKS
    masks.mkdir(exist_ok=True)
    lab = seg.labels.cpu().numpy()
    for i, name in enumerate(names):
        Image.fromarray(((lab == i) * 255).astype(np.uint8)).save(masks / f"{i:03d}_{file_part(name)}.png")


def npz_arrays(seg) -> dict[str, np.ndarray]:
    """logits (raw cosine, queries x H x W), probs, labels, class_names (+ labels_coarse/probs_coarse when refined);
    `pred`/`pred_coarse` repeat the label maps under the reference harness's names."""
    arrays = {"logits": seg.logits().cpu().numpy().astype(np.float32),
              "probs": seg.probs.cpu().numpy().astype(np.float32),
              "labels": seg.labels.cpu().numpy().astype(np.int32), "class_names": np.array(seg.classes.names),
              "query_words": np.array(seg.classes.queries), "query_idx": np.array(seg.classes.query_class)}
    if seg.refined:
        arrays["labels_coarse"] = seg.labels_coarse.cpu().numpy().astype(np.int32)
        arrays["probs_coarse"] = seg.probs_coarse.cpu().numpy().astype(np.float32)
        arrays["pred_coarse"] = arrays["labels_coarse"]
    arrays["pred"] = arrays["labels"]  # the reference harness's names for the label maps
    return arrays


def save_npz(seg, path: str | os.PathLike, key: str | None = None) -> None:
    """The npz of `npz_arrays`, written atomically; with `key`, also `run_key` (what `npz_complete` checks)."""
    arrays = npz_arrays(seg)
    if key is not None:
        arrays["run_key"] = np.array(key)
    path = Path(path)
    remove_partials(path)
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def npz_complete(path: Path, key: str) -> bool:
    """Whether `path` is an npz written by `save_npz` with this key (unreadable counts as incomplete)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return "run_key" in z.files and str(z["run_key"]) == key
    except (OSError, ValueError, EOFError, KeyError):
        return False


def marker_matches(folder: Path, key: str) -> bool:
    """Whether `folder` holds the completion marker of outputs made with this key."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _marker(key: str, settings: dict) -> bytes:
    """The completion marker: the outputs' key and the settings that made them (the same for any layout)."""
    return json.dumps({"key": key, "settings": settings}, indent=1, sort_keys=True).encode()


Extra = Callable[[object, np.ndarray, Path], None]
"""More files of one segmentation written beside the images (e.g. its objects), into the same temporary folder."""


def save_folder(seg, image: np.ndarray, final: Path, key: str, settings: dict, extra: Extra | None = None) -> None:
    """An image's own output folder: written complete (marker included) under a temporary name, then renamed."""
    remove_partials(final)
    tmp = partial_name(final)
    try:
        write_images(seg, image, tmp)
        if extra is not None:
            extra(seg, image, tmp)
        (tmp / MARKER).write_bytes(_marker(key, settings))
        replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_flat(seg, image: np.ndarray, out: Path, key: str, settings: dict, extra: Extra | None = None) -> None:
    """The single-image layout: the files directly in `out` (a folder that may hold other things), each moved in
    complete, masks/ replaced as a whole, the marker written last."""
    tmp = partial_name(out / "outputs")
    remove_partials(out / "outputs")
    try:
        write_images(seg, image, tmp)
        if extra is not None:
            extra(seg, image, tmp)
        write_atomic(out / MARKER, _marker("", settings))  # incomplete from here on, yet still our folder
        written = {entry.name for entry in tmp.iterdir()}
        for entry in sorted(tmp.iterdir()):
            if entry.is_dir():
                replace_folder(entry, out / entry.name)
            else:
                os.replace(entry, out / entry.name)
        for stale in (out / name for name in OPTIONAL_OUTPUTS if name not in written):  # an earlier run's extras
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        write_atomic(out / MARKER, _marker(key, settings))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
