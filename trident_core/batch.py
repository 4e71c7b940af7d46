"""`segment` over many images in one process: the models loaded and the text encoded once, each image's outputs
written atomically and skipped when a previous run completed them, the images shared over torchrun's processes
(rank r takes images r, r+W, ...), unreadable images reported, counted and skipped."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .image import ImageError, to_rgb_uint8
from .image_list import ImageJob
from .outputs import Extra, marker_matches, npz_complete, save_flat, save_folder, save_npz

EXIT_SKIPPED = 3  # some images could not be read (the others were segmented)


@dataclass(frozen=True)
class Destinations:
    """Where an image's outputs go: `out/<name>/` and `npz/<name>.npz`, or (`flat`, one image) `out/` and the
    npz file itself."""

    out: Path | None
    npz: Path | None
    flat: bool
    extra: Extra | None = None  # more files per image folder (the objects of --instances)

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
    """The key an image's outputs are stored under: the settings' digest and the image file's content."""
    return hashlib.sha256(f"{settings_digest}:{hashlib.sha256(path.read_bytes()).hexdigest()}".encode()).hexdigest()


def is_complete(dest: Destinations, job: ImageJob, key: str) -> bool:
    """Whether every output asked for exists from a run with the same settings and image."""
    folder, npz = dest.folder(job), dest.npz_file(job)
    return (folder is None or marker_matches(folder, key)) and (npz is None or npz_complete(npz, key))


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
        line = f"[{self.tag}] [{bar:<{width}}] {done}/{self.total}  {rate:.2f} img/s  ETA {eta}  {name}"
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


def run(segment: Callable, jobs: list[ImageJob], dest: Destinations, settings: dict, *, rank: int = 0,
        world: int = 1, resume: bool = True, log: Callable[[str], None] = print, show_progress: bool = True) -> Counts:
    """Segment this rank's share of `jobs` with `segment(image) -> Segmentation` and write their outputs."""
    digest = settings_key(settings)
    mine = jobs[rank::world]
    counts = Counts()
    bar = ProgressBar(len(mine), "segment" + (f" rank {rank}/{world}" if world > 1 else "")) if show_progress \
        else None
    for done, job in enumerate(mine, 1):
        try:
            key = image_key(digest, job.path)
            image = None if resume and is_complete(dest, job, key) else to_rgb_uint8(job.path)
        except (ImageError, OSError) as e:
            counts.unreadable += 1
            if bar and bar.tty:
                bar.stream.write("\n")
            reason = _reason(e)
            log(f"skipped: {reason}" if str(job.path) in reason else f"skipped {job.path}: {reason}")
            image = key = None
        if image is not None:
            _write(segment(image), image, job, dest, key, settings)
            counts.segmented += 1
        elif key is not None:
            counts.complete += 1
        del image
        if bar:
            bar.update(done, counts.segmented, job.name)
    if bar:
        bar.close()
    return counts


def _write(seg, image, job: ImageJob, dest: Destinations, key: str, settings: dict) -> None:
    """The npz first, then the image files with the completion marker."""
    npz, folder = dest.npz_file(job), dest.folder(job)
    if npz is not None:
        save_npz(seg, npz, key)
    if folder is not None:
        (save_flat if dest.flat else save_folder)(seg, image, folder, key, settings, dest.extra)


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if isinstance(e, ImageError) else f"cannot read the file ({type(e).__name__}: {text})"
