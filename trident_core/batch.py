"""`segment` over many images in one process: the models loaded and the text encoded once, each image's outputs
written atomically and skipped when a previous run completed them, the images shared over torchrun's processes
(rank r takes images r, r+W, ...), unreadable images reported, counted and skipped."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from .atomic import remove_partials
from .image import ImageError, check_header, to_rgb_uint8
from .image_list import ImageJob
from .marker import INSTANCES, INSTANCES_JSON, MARKER, OUTPUT_FOLDERS, complete
from .outputs import (
    Extra,
    OutputConflict,
    check_npz_replaceable,
    check_planned,
    npz_complete,
    save_flat,
    save_folder,
    save_npz,
)

EXIT_SKIPPED = 3  # some images could not be read or segmented (the others were)
_FATAL_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # every later image would fail the same way


@dataclass(frozen=True)
class Destinations:
    """Where an image's outputs go: `out/<name>/` and `npz/<name>.npz`, or (`flat`, one image) `out/` and the
    npz file itself."""

    out: Path | None
    npz: Path | None
    flat: bool
    extra: Extra | None = None  # more files per image folder (the objects of --instances)
    planned: tuple[str, ...] = ()  # the files every image folder holds (outputs.planned_files)
    protected: frozenset[str] = frozenset()  # the inputs' real paths: never an output

    def folder(self, job: ImageJob) -> Path | None:
        return None if self.out is None else self.out if self.flat else self.out / job.name

    def npz_file(self, job: ImageJob) -> Path | None:
        if self.npz is None:
            return None
        return self.npz / f"{Path(job.name).name}.npz" if self.flat and self.npz.is_dir() else (
            self.npz if self.flat else self.npz / f"{job.name}.npz")


def settings_key(settings: dict) -> str:
    """A digest of everything that decides an image's outputs besides the image."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def image_key(settings_digest: str, path: Path) -> str:
    """The key an image's outputs are stored under: the settings' digest and the image file's content (read in
    blocks: a huge file costs no memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return hashlib.sha256(f"{settings_digest}:{h.hexdigest()}".encode()).hexdigest()


def check_destinations(jobs: list[ImageJob], dest: Destinations) -> None:
    """Refuse, before any work, a run whose outputs would land on an input image or on files Trident did not
    write: image folders where a file is (the images themselves, when --out is the images' folder), an npz named
    like an input, and in the single-image form outputs whose names a user's files already have."""
    inputs = {os.path.realpath(job.path): job.path for job in jobs}
    for job in jobs:
        folder, npz = dest.folder(job), dest.npz_file(job)
        if not dest.flat and folder is not None and os.path.lexists(folder) and not folder.is_dir():
            raise ValueError(f"--out {dest.out}: the outputs of {job.name} go into the folder {folder}, where a file "
                             "is (the image itself?); choose an --out that is not the images' folder")
        if npz is not None:
            try:
                check_npz_replaceable(npz, dest.protected)
            except OutputConflict as e:
                raise ValueError(str(e)) from e
            if folder is not None and _writes(folder, os.path.realpath(npz), dest.planned):
                raise ValueError(f"--save-npz {npz} is a file that --out {dest.out} also writes: choose another name")
    owners = {os.path.realpath(f): f for f in (dest.folder(job) for job in jobs) if f is not None}
    for real, path in inputs.items():
        parent = os.path.dirname(real)
        name, top = os.path.basename(real), os.path.dirname(parent)
        inside = ((parent in owners and name in dest.planned) or
                  (top in owners and f"{os.path.basename(parent)}/{name}" in dest.planned) or
                  (top in owners and os.path.basename(parent) in (INSTANCES,)))
        if inside:
            raise ValueError(f"the input image {path} lies where this run writes its outputs (--out "
                             f"{dest.out}): choose another --out")
    if dest.flat and dest.out is not None:
        try:
            check_planned(dest.out, list(dest.planned), dest.protected, (INSTANCES,) if dest.extra else ())
        except OutputConflict as e:
            raise ValueError(f"{e} (the single-image form writes its files directly into --out)") from e


def _writes(folder: Path, real: str, planned: tuple[str, ...]) -> bool:
    """Whether the file at real path `real` is one an output folder holds: a planned file, the marker, the objects."""
    rel = Path(os.path.relpath(real, os.path.realpath(folder))).as_posix()
    return rel in planned or rel in (MARKER, INSTANCES_JSON) or rel.split("/")[0] in OUTPUT_FOLDERS


def is_complete(dest: Destinations, job: ImageJob, key: str) -> bool:
    """Whether every output asked for is there, whole, from a run with the same settings and image."""
    folder, npz = dest.folder(job), dest.npz_file(job)
    return (folder is None or complete(folder, key, list(dest.planned))) and (npz is None or npz_complete(npz, key))


def shown(text: str) -> str:
    """`text` printable on any stream: bytes of a file name that are not UTF-8 shown as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ProgressBar:
    """Images done of this process's share, images per second of this run and time left, on stderr: one line
    rewritten in place on a terminal, a line per image otherwise."""

    def __init__(self, total: int, tag: str, stream: TextIO | None = None):
        self.total, self.tag, self.stream = total, tag, stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()

    def update(self, done: int, new: int, name: str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = new / elapsed if elapsed > 0 and new else 0.0
        left = (self.total - done) / rate if rate else None
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left is not None else "--:--:--"
        width = 24
        bar = "#" * (width * done // max(self.total, 1))
        line = f"[{self.tag}] [{bar:<{width}}] {done}/{self.total}  {rate:.2f} img/s  ETA {eta}  {shown(name)}"
        self.stream.write(("\r\x1b[K" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Counts:
    """What a process did with its share."""

    segmented: int = 0
    complete: int = 0  # done by a previous run
    unreadable: int = 0


class StopRun(OSError):
    """A disk full or read-only: every later image would fail the same way."""


_PER_IMAGE_ERRORS = (ImageError, OutputConflict, OSError, MemoryError, torch.OutOfMemoryError)


def run(segment: Callable[[Iterable[np.ndarray]], Iterator], jobs: list[ImageJob], dest: Destinations,
        settings: dict, *, rank: int = 0, world: int = 1, resume: bool = True, log: Callable[[str], None] = print,
        show_progress: bool = True) -> Counts:
    """Segment this rank's share of `jobs` with `segment(images) -> segmentations` (in the images' order; it may
    read a few images ahead to share forwards on a GPU: `Trident.segment_frames`) and write their outputs."""
    mine = jobs[rank::world]
    bar = ProgressBar(len(mine), "segment" + (f" rank {rank}/{world}" if world > 1 else "")) if show_progress \
        else None
    share = _Share(dest, settings, settings_key(settings), resume, log, bar)
    queue = iter(mine)
    while True:
        failed, reason = [], ""
        try:
            for seg in segment(share.images(queue)):
                share.write(seg, *share.pending.popleft())
                del seg  # (not held while the next image is segmented)
            break
        except _PER_IMAGE_ERRORS as e:  # segmenting the images read for it: they fail, the run goes on
            failed = list(share.pending)
            share.pending.clear()
            if isinstance(e, StopRun) or not failed:
                raise
            if len(failed) == 1:
                share.fail(failed[0][0], e)
                continue
            reason = _reason(e)
        # (out of the except clause: the failed forward's tensors, held by its traceback, are freed first)
        share.say(f"{len(failed)} images sharing a forward failed ({reason}): each again alone")
        for job, key, image in failed:
            try:
                share.write(next(iter(segment([image]))), job, key, image)
            except _PER_IMAGE_ERRORS as e_alone:
                share.fail(job, e_alone)
    if bar:
        bar.close()
    return share.counts


@dataclass
class _Share:
    """A process's share of the images as `run` goes through it: the images read and not yet written (`pending`:
    job, key, image), what was done, the progress shown."""

    dest: Destinations
    settings: dict
    digest: str
    resume: bool
    log: Callable[[str], None]
    bar: ProgressBar | None
    counts: Counts = field(default_factory=Counts)
    pending: deque[tuple[ImageJob, str, np.ndarray]] = field(default_factory=deque)
    done: int = 0

    def images(self, queue: Iterator[ImageJob]) -> Iterator[np.ndarray]:
        """The images of `queue` still to segment, each read as it is asked for; complete and unreadable ones are
        counted on the way."""
        for job in queue:
            entry = self._read(job)
            if entry is not None:
                self.pending.append(entry)
                yield entry[2]
            entry = None

    def _read(self, job: ImageJob) -> tuple[ImageJob, str, np.ndarray] | None:
        """The job with its outputs' key and its image, or None where it is complete or cannot be read."""
        try:
            if job.error:
                raise ImageError(job.error)
            if not job.path.is_file():  # a pipe or a device would block or never end
                raise ImageError(f"{job.path} is not a regular file" if job.path.exists() else
                                 f"{job.path} does not exist")
            check_header(job.path)  # a junk file is refused before it is read whole
            key = image_key(self.digest, job.path)
            if self.resume and is_complete(self.dest, job, key):
                _remove_leftovers(self.dest, job)
                self.counts.complete += 1
                self._shown(job)
                return None
            return job, key, to_rgb_uint8(job.path)
        except _PER_IMAGE_ERRORS as e:
            self.fail(job, e)
            return None

    def write(self, seg, job: ImageJob, key: str, image: np.ndarray) -> None:
        """An image's outputs (a failure to write them fails this image only, unless no later image could be
        written either)."""
        try:
            _write(seg, image, job, self.dest, key, self.settings)
        except _PER_IMAGE_ERRORS as e:
            self.fail(job, e)
            return
        self.counts.segmented += 1
        self._shown(job)

    def fail(self, job: ImageJob, e: Exception) -> None:
        """The image is skipped with its reason logged; a full or read-only disk stops the run."""
        if isinstance(e, StopRun):
            raise e
        if isinstance(e, OSError) and e.errno in _FATAL_WRITE_ERRORS:
            raise StopRun(e.errno, f"{e.strerror} while writing the outputs of {job.name}: make room or "
                          "choose another --out, then run the same command again (complete images are "
                          "kept)") from e
        self.counts.unreadable += 1
        reason = _reason(e)
        self.say(f"skipped: {reason}" if str(job.path) in reason else f"skipped {job.path}: {reason}")
        self._shown(job)

    def say(self, text: str) -> None:
        """A line of the log (on a line of its own below a progress bar drawn in place)."""
        if self.bar and self.bar.tty:
            self.bar.stream.write("\n")
        self.log(shown(text))

    def _shown(self, job: ImageJob) -> None:
        self.done += 1
        if self.bar:
            self.bar.update(self.done, self.counts.segmented, job.name)


def _write(seg, image, job: ImageJob, dest: Destinations, key: str, settings: dict) -> None:
    """The npz first, then the image files with the completion marker."""
    npz, folder = dest.npz_file(job), dest.folder(job)
    if npz is not None:
        save_npz(seg, npz, key, dest.protected)
    if folder is not None:
        (save_flat if dest.flat else save_folder)(seg, image, folder, key, settings, dest.extra, dest.protected)


def _remove_leftovers(dest: Destinations, job: ImageJob) -> None:
    """What a run killed while replacing this image's complete outputs left under temporary names."""
    if dest.flat:  # (the single-image form removes its leftovers when it next writes)
        return
    for final in (dest.folder(job), dest.npz_file(job)):
        if final is not None:
            remove_partials(final)


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, (ImageError, OutputConflict)):
        return text
    if isinstance(e, OSError):
        return f"cannot read or write its files ({type(e).__name__}: {text})"
    return f"out of memory ({type(e).__name__}: {text}); downscale it or free memory"
