"""Video clips in and out, one frame at a time (never a whole clip in memory).

Read: video files through OpenCV (FFmpeg), animated GIF/WebP through PIL, a folder of frames in natural order
(`frame2.png` before `frame10.png`); every frame RGB uint8 of the first frame's size. A clip without frames, one
that cannot be decoded or a frame of another size is a `VideoError`: one line naming the file and the frame.
Write: MPEG-4 Part 2 video (`mp4v` in .mp4, the encoder every OpenCV wheel has; binary masks survive it: read back
and thresholded at 128 they are exact) under a temporary name, renamed when complete; PNG sequences into a
temporary folder, renamed when complete."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .atomic import partial_name, remove_partials, replace_folder
from .image import MAX_PIXELS, ImageError, header_size, read_image
from .image_list import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
ANIMATED_EXTENSIONS = (".gif", ".webp")
FOLDER_FPS = 24.0  # a folder of frames has no frame rate of its own
DEFAULT_FPS = 10.0  # an animated image without frame durations
MIN_FPS, MAX_FPS = 0.1, 1000.0  # the rates videos are written at (MPEG-4's time base fails for a rate near 0)
OPEN_FILES_MARGIN = 256  # files a run opens besides its mask videos (models, images, Python's own)

logger = logging.getLogger(__name__)


class VideoError(ImageError):
    """A clip that cannot be read as one: no frames, an undecodable file, frames of different sizes."""


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """A folder's entries named as image files (not sub-folders, hidden ones left out) in natural order; a
    dangling link or a pipe among them is kept, to be reported by `open_clip`, not dropped (which shifts the clip)."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
             and not p.name.startswith(".")]
    return sorted(files, key=lambda p: _natural_key(p.name))


def is_clip(path: str | os.PathLike) -> bool:
    """Whether a file is a clip: a video file, or a GIF/WebP with more than one frame."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() in VIDEO_EXTENSIONS:
        return True
    if p.suffix.lower() not in ANIMATED_EXTENSIONS:
        return False
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                return getattr(im, "n_frames", 1) > 1
    except Image.DecompressionBombError:
        return True  # (open_clip refuses its size in one line)
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Clip:
    """A clip to read: its path (a file or a folder of frames), frame rate, frame size (H, W) and number of frames
    (the container's count for video files, which may be an estimate). Iterating reads the frames one by one."""

    path: Path
    fps: float
    size: tuple[int, int]
    frames: int

    def __iter__(self) -> Iterator[np.ndarray]:
        decoded = 0
        for where, frame in _frames(self.path):
            if frame.shape[:2] != self.size:
                raise VideoError(f"{where} is {frame.shape[1]}x{frame.shape[0]} pixels, the clip's first frame "
                                 f"{self.size[1]}x{self.size[0]}: a clip's frames must have one size")
            decoded += 1
            yield frame
        if not decoded:
            raise VideoError(f"{self.path}: no frame could be decoded (an empty clip, or a codec this OpenCV "
                             "cannot decode)")
        if decoded >= self.frames - _count_slack(self.path, self.frames):
            return
        if _counted(self.path):
            raise VideoError(f"{self.path}: frame {decoded} cannot be decoded, {decoded} of the {self.frames} frames "
                             "its header declares: the file is cut short or damaged")
        logger.warning("%s: %d frames decoded of the %d its container's duration suggests (an audio track longer "
                       "than the video does this, and so does a file cut short: if so, its end is missing)",
                       self.path, decoded, self.frames)


def _counted(path: Path) -> bool:
    """Whether a clip's frame count is exact: a folder's or an animation's, or a container that counts its frames
    (MP4, MOV, AVI). FFmpeg estimates WebM's and Matroska's from the container's duration, which a longer audio
    track sets: a shortfall there is no proof of damage."""
    return path.is_dir() or path.suffix.lower() in (*ANIMATED_EXTENSIONS, ".mp4", ".mov", ".m4v", ".avi")


def _count_slack(path: Path, count: int) -> int:
    """Frames a whole file may fall short of its declared count: none where it is counted exactly (folders,
    animated images), one in the containers that count their frames (a last frame some encoders declare but leave
    empty), 5 % where the count is estimated."""
    if path.is_dir() or path.suffix.lower() in ANIMATED_EXTENSIONS:
        return 0
    return 1 if _counted(path) else max(1, count // 20)


def open_clip(path: str | os.PathLike, folder_fps: float = FOLDER_FPS) -> Clip:
    """A clip's description, its first frame read to check that it decodes (a VideoError in one line if not)."""
    p = Path(path)
    if p.is_dir():
        files = frame_files(p)
        if not files:
            raise VideoError(f"{p}: no frames (image files {', '.join(IMAGE_EXTENSIONS)}) in this folder")
        for f in files:
            if not f.is_file():
                raise VideoError(f"frame {f}: not a readable image file (a dangling link, a pipe or a device); "
                                 "put the frame back or remove the entry")
        _check_frame_headers(files)
        fps, count = folder_fps, len(files)
    elif not p.is_file():
        raise VideoError(f"{p}: no such video file or folder of frames")
    elif p.suffix.lower() in ANIMATED_EXTENSIONS:
        fps, count = _animated_info(p)
    else:
        fps, count = _video_info(p)
    for _where, first in _frames(p):
        return Clip(p, fps, first.shape[:2], count)
    raise VideoError(f"{p}: no frame could be decoded (an empty clip, or a codec this OpenCV cannot decode)")


def _frames(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(where, frame) for each frame of a folder, an animated image or a video file."""
    if path.is_dir():
        return _folder_frames(path)
    if path.suffix.lower() in ANIMATED_EXTENSIONS:
        return _animated_frames(path)
    return _video_frames(path)


def _check_frame_headers(files: list[Path]) -> None:
    """Every frame's header read (not its pixels) before the clip runs: a file that is no image, or a frame of
    another size than the first, is refused before the models load, not when the run reaches it."""
    first: tuple[Path, tuple[int, int]] | None = None
    for f in files:
        try:
            size = header_size(f)
        except ImageError as e:
            raise VideoError(f"frame {f}: {e}") from e
        if size is None:  # (a header PIL cannot read: decoding the frame says why)
            continue
        if first is None:
            first = (f, size)
        elif size != first[1]:
            raise VideoError(f"{f} is {size[1]}x{size[0]} pixels, the clip's first frame {first[0].name} "
                             f"{first[1][1]}x{first[1][0]}: a clip's frames must have one size")


def _folder_frames(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    for f in frame_files(folder):
        try:
            yield str(f), read_image(f)
        except ImageError as e:
            raise VideoError(f"frame {f}: {e}") from e


def _animated_info(path: Path) -> tuple[float, int]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (our own limit: _check_pixels)
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h <= MAX_PIXELS:  # (refused below, before a frame is decoded)
                im.load()  # (WebP tells a frame's duration once it is decoded)
            count = getattr(im, "n_frames", 1)
            duration = _total_duration(im, count) if w * h <= MAX_PIXELS else 0
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise VideoError(f"{path}: cannot read it as an animated image ({e})") from e
    _check_pixels(path, w, h)
    return _writable(1000.0 * count / duration if duration else DEFAULT_FPS), count


def _total_duration(im, count: int) -> float:
    """The animation's length in milliseconds, every frame's duration summed (a GIF often holds its first frame
    for seconds: the first frame's duration alone made its video many times too long)."""
    total = 0.0
    for i in range(count):
        im.seek(i)
        im.load()  # (WebP tells a frame's duration once it is decoded)
        total += im.info.get("duration") or 0
    return total


def _animated_frames(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (its size was checked by open_clip)
        im = Image.open(path)
    with im:
        for k in range(getattr(im, "n_frames", 1)):
            try:
                im.seek(k)
                frame = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, EOFError) as e:
                raise VideoError(f"{path}: frame {k} cannot be decoded ({e})") from e
            yield f"{path}: frame {k}", frame


def check_opencv_path(path: Path, what: str) -> None:
    """Refuse a path OpenCV's video reader and writer would crash on (bytes that are not UTF-8 in its name or its
    folders'), in one line, before they are given it."""
    try:
        os.fspath(Path(path).absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise VideoError(f"{what} {os.fspath(path)!r}: its path has bytes that are not UTF-8, which OpenCV's video "
                         "reader and writer cannot take; rename it (or the folders on its way)") from None


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV's own log lines silenced: a failure is our one line, not FFmpeg's."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def _capture(path: Path) -> cv2.VideoCapture:
    check_opencv_path(path, "the video")
    with _quiet_opencv():
        cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(f"{path}: cannot open it as a video (not a video, or a container/codec this OpenCV cannot "
                         "read; convert it to H.264 .mp4 or to a folder of PNG frames)")
    return cap


def _video_info(path: Path) -> tuple[float, int]:
    cap = _capture(path)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        count = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    finally:
        cap.release()
    _check_pixels(path, w, h)
    return _writable(fps if fps and np.isfinite(fps) and fps > 0 else FOLDER_FPS), count


def _writable(fps: float) -> float:
    """A clip's own frame rate within the rates its outputs can be written at (a slideshow GIF of 2000 s per
    frame: 0.1)."""
    return min(MAX_FPS, max(MIN_FPS, fps))


def _video_frames(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    cap = _capture(path)
    try:
        k = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            yield f"{path}: frame {k}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            k += 1
    finally:
        cap.release()


def _check_pixels(path: Path, w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise VideoError(f"{path}: frames of {w}x{h} pixels, more than {MAX_PIXELS // 10**6} megapixels; downscale "
                         "the clip first")


MIN_VIDEO_SIDE = 16  # OpenCV's MPEG-4 encoder crashes the process on some smaller frames (4x4 grey)
MAX_VIDEO_SIDE = 8190  # MPEG-4 Part 2 codes a side in 13 bits: 8192 is refused ("dimensions too large")


def check_video_size(size: tuple[int, int], what: str) -> None:
    """Refuse frames of `size` (H, W) that a video cannot hold."""
    if min(size) < MIN_VIDEO_SIDE:
        raise ValueError(f"{what} has frames of {size[1]}x{size[0]} pixels: too small for a video (at least "
                         f"{MIN_VIDEO_SIDE}x{MIN_VIDEO_SIDE}); scale it up first")
    if max(video_size(size)) > MAX_VIDEO_SIDE:
        raise ValueError(f"{what} has frames of {size[1]}x{size[0]} pixels: too large for an MPEG-4 video (at most "
                         f"{MAX_VIDEO_SIDE} pixels a side); downscale the clip first")


def video_size(size: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) a video of frames of `size` has: MPEG-4 takes even sizes only (an odd one was cut by a row or
    column), so an odd side is padded by one, its last row or column repeated."""
    return size[0] + size[0] % 2, size[1] + size[1] % 2


class VideoWriter:
    """A video file written frame by frame (RGB or grey uint8 frames of one size, padded to `video_size`), under a
    temporary name until `close()` has read it back whole (OpenCV's encoder reports no write error: a full disk
    would leave a video cut short); `abort()` (or leaving a `with` block by an exception) removes it."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int], color: bool = True) -> None:
        check_video_size(size, f"the video {path}")
        self.path, self.size, self.color, self.count = Path(path), tuple(size), color, 0
        try:
            remove_partials(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # (out of file descriptors here or in the encoder below: the same one line)
            if e.errno != errno.EMFILE:
                raise
            raise OSError(f"cannot write the video {self.path}: {_reason(e)}") from e
        self.tmp = partial_name(self.path).with_name(partial_name(self.path).name + self.path.suffix)
        h, w = video_size(self.size)
        check_opencv_path(self.tmp, "the video")
        with _quiet_opencv():
            self._writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h),
                                           isColor=color)
        if not self._writer.isOpened():
            raise OSError(f"cannot write the video {self.path}: {_why_not_written(self.tmp)}")

    def write(self, frame: np.ndarray) -> None:
        if frame.shape[:2] != self.size:
            raise ValueError(f"a {frame.shape[1]}x{frame.shape[0]} frame for the {self.size[1]}x{self.size[0]} "
                             f"video {self.path}")
        (h, w), (vh, vw) = self.size, video_size(self.size)
        if (vh, vw) != (h, w):
            frame = cv2.copyMakeBorder(frame, 0, vh - h, 0, vw - w, cv2.BORDER_REPLICATE)
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR) if self.color else frame)
        self.count += 1

    def close(self) -> None:
        self._writer.release()
        try:
            cap = _capture(self.tmp)
            readable = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            if (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))) != video_size(
                    self.size):
                readable = 0  # (not the video written)
            cap.release()
        except VideoError:
            readable = 0
        if readable != self.count:
            self.tmp.unlink(missing_ok=True)
            raise OSError(f"writing the video {self.path} failed: {readable} of its {self.count} frames can be read "
                          "back (is the disk full?)")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._writer.release()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, *_exc) -> None:
        self.abort() if kind is not None else self.close()


def _why_not_written(path: Path) -> str:
    """Why OpenCV could not open a video at `path` (the writer's temporary name): the system's reason where a plain
    file cannot be made there either (too many open files, a full disk, no permission), else the encoder. What
    OpenCV left there is removed first (it would read as "File exists")."""
    try:
        path.unlink(missing_ok=True)
        with open(path, "xb"):
            pass
    except OSError as e:
        return _reason(e)
    path.unlink()
    return "this OpenCV has no MPEG-4 (mp4v) encoder"


def _reason(e: OSError) -> str:
    """The system's reason a file could not be made, with what to do when the process ran out of descriptors."""
    if e.errno == errno.EMFILE:
        return (f"{e.strerror} (every class that appears in a clip keeps its mask video open: raise the limit, "
                "e.g. `ulimit -n 4096`, or name fewer classes)")
    return e.strerror or str(e)


def allow_open_files(count: int) -> None:
    """Raise this process's limit of open files (the soft one, up to the hard one) to hold `count` more, where it is
    lower: a clip keeps a mask video open per class that appears (Linux's usual 1024 is short of ADE20K-847's
    classes). Nothing changes where the system has no such limit (Windows)."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + OPEN_FILES_MARGIN
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                        hard))
        except (ValueError, OSError):  # (macOS caps it below an unlimited hard limit: the writers then say so)
            pass


class FrameFolder:
    """A PNG sequence (000000.png, 000001.png, ...) written into a temporary folder, put in place by `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        remove_partials(self.path)
        self.tmp = partial_name(self.path)
        self.tmp.mkdir(parents=True)
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        from .outputs import save_png

        save_png(frame, self.tmp / f"{self.count:06d}.png", compress_level=1)  # signed: ours (marker.py)
        self.count += 1

    def close(self) -> None:
        replace_folder(self.tmp, self.path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
