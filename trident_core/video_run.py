"""`segment` on a video clip: `python -m trident_core segment clip.mp4 --classes "horse, grass" --out DIR`.

The frames are read, segmented and written one at a time (memory stays flat in the clip's length): the optical
flow between consecutive frames serves the temporal smoothing (`--smooth`) and the object tracker
(`--instances`). Written into --out:
- `overlay.mp4`: the colour label map over the frames; `masks/NNN_<class>.mp4`: one mask video per class;
- with --instances: `instances/NNN_<class>.mp4` (NNN the object's id) one mask video per tracked object,
  `tracks.json` (tracking.Track.as_dict per object) and `tracks.mp4` (each object in its colour with its id);
- with --png-frames: each mask video's frames as PNGs too, in a folder beside it (`masks/NNN_<class>/000000.png`);
- `trident.json`, the marker (marker.py) listing the files written.
They are written into a temporary folder and moved into --out when the clip is done, as the single-image form's
outputs are (outputs.place_outputs): a file already in --out is replaced only where an earlier run's marker lists
it, a run that fails leaves --out as it was."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np

from .atomic import fresh_folder, partial_name, remove_partials, write_atomic
from .marker import INSTANCES, MASKS, OVERLAY_VIDEO, TRACKS_JSON, TRACKS_VIDEO
from .outputs import check_planned, numbered, place_outputs
from .video_io import (
    FOLDER_FPS,
    MAX_FPS,
    MIN_FPS,
    Clip,
    FrameFolder,
    VideoWriter,
    allow_open_files,
    check_opencv_path,
    check_video_size,
    frame_files,
    is_clip,
    open_clip,
    video_size,
)


def add_video_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of a clip run (`segment` takes a video file, or a folder of frames with --video)."""
    from .temporal import MAX_STRENGTH
    from .tracking import DEFAULT_MAX_GAP

    ap.add_argument("--video", action="store_true",
                    help="take the folder given as IMAGE as one clip (its frames in natural order), not as images")
    ap.add_argument("--smooth", type=float, default=0.0,
                    help=f"clips: temporal smoothing of the class probabilities, 0 (off) to {MAX_STRENGTH}; steadier "
                         "labels, a few frames' lag on fast changes (default: %(default)s)")
    ap.add_argument("--max-gap", type=int, default=DEFAULT_MAX_GAP,
                    help="clips with --instances: frames an object may be missing and keep its id (default: "
                         "%(default)s)")
    ap.add_argument("--png-frames", action="store_true", help="clips: the mask videos' frames as PNG files too")
    ap.add_argument("--fps", type=float, help="clips: frame rate of the videos written, from "
                                              f"{MIN_FPS:g} to {MAX_FPS:g} (default: the clip's own, within those; "
                                              f"{FOLDER_FPS:g} for a folder of frames)")


def is_video_run(args: argparse.Namespace) -> bool:
    """Whether the arguments name a clip: --video, or one video file / animated GIF or WebP."""
    return bool(args.video) or (len(args.images) == 1 and is_clip(args.images[0]))


def check_image_run(args: argparse.Namespace) -> None:
    """Refuse, for a run of images, the options only a clip takes (they would be silently ignored) and a clip
    among the images (it would be skipped as no image)."""
    from .tracking import DEFAULT_MAX_GAP

    given = [name for name, on in (("--smooth", args.smooth), ("--png-frames", args.png_frames),
                                   ("--fps", args.fps is not None), ("--max-gap", args.max_gap != DEFAULT_MAX_GAP))
             if on]
    if given:
        raise ValueError(f"{given[0]} is for clips (a video file, an animated GIF or WebP, or a folder of frames with "
                         "--video); these inputs are images")
    clips = [name for name in args.images if is_clip(name)]
    if clips:
        raise ValueError(f"{clips[0]} is a clip: segment each clip with its own command (images and clips do not "
                         "mix)")


def _check_args(args: argparse.Namespace) -> Path:
    """The clip's path, once the options that do not fit a clip are refused (before anything loads)."""
    from .temporal import check_strength
    from .tracking import check_max_gap

    if len(args.images) != 1:
        raise ValueError(f"a clip run takes one video file or folder of frames, got {len(args.images)} inputs: "
                         "segment each clip with its own command")
    path = Path(args.images[0])
    if args.video and not path.is_dir():
        raise ValueError(f"--video takes a folder of frames; {path} is not a folder (give a video file without "
                         "--video)")
    if args.save_npz:
        raise ValueError("--save-npz is for images; a clip's outputs go to --out")
    if not args.out:
        raise ValueError("a clip's outputs go to a folder: give --out DIR")
    check_strength(args.smooth)
    check_max_gap(args.max_gap)
    if args.fps is not None and not (MIN_FPS <= args.fps <= MAX_FPS):
        raise ValueError(f"--fps must be a frame rate from {MIN_FPS:g} to {MAX_FPS:g}, not {args.fps}")
    return path


def clip_planned(names: list[str], tracks: bool, png: bool) -> list[str]:
    """The files a clip run always writes (its objects' are counted when found), checked before any work."""
    stems = [numbered(k, len(names), n, "") for k, n in enumerate(names)]
    return [OVERLAY_VIDEO, *(f"{MASKS}/{s}.mp4" for s in stems), *(f"{MASKS}/{s}/{0:06d}.png" for s in stems if png),
            *([TRACKS_JSON, TRACKS_VIDEO] if tracks else [])]


def _inputs(path: Path) -> frozenset[str]:
    """The clip's own files (its frames for a folder): never an output path."""
    files = frame_files(path) if path.is_dir() else [path]
    return frozenset(os.path.realpath(f) for f in files)


class _ClipWriters:
    """The streamed outputs of a clip in the run's folder `tmp`: overlay video, a mask video per class (and PNG
    frames), tracked preview.

    A class's mask video is opened when the class first appears (its earlier frames written empty then), and
    those of classes that never appear are written at the end, one at a time: a long class list does not hold a
    video encoder per class."""

    def __init__(self, tmp: Path, names: list[str], fps: float, size: tuple[int, int], png: bool,
                 tracks: bool) -> None:
        self.tmp, self.names, self.fps, self.size, self.png = tmp, names, fps, size, png
        allow_open_files(len(names) + 2)  # (a mask video per class that appears, the overlay and the tracks)
        self.frames = 0
        self.items: list = []
        self.masks: dict[int, list] = {}
        try:
            self.items.append(VideoWriter(tmp / OVERLAY_VIDEO, fps, size))
            self.tracks = VideoWriter(tmp / TRACKS_VIDEO, fps, size) if tracks else None
        except BaseException:
            self.abort()
            raise
        if self.tracks:
            self.items.append(self.tracks)

    def _mask_outputs(self, stem: str, empty_frames: int) -> list:
        """A mask video (and PNG folder) named `stem` starting with `empty_frames` empty frames."""
        outs = [VideoWriter(self.tmp / f"{stem}.mp4", self.fps, self.size, color=False)]
        self.items.append(outs[0])
        if self.png:
            outs.append(FrameFolder(self.tmp / stem))
            self.items.append(outs[1])
        empty = np.zeros(self.size, np.uint8)
        for _ in range(empty_frames):
            for o in outs:
                o.write(empty)
        return outs

    def _class_outputs(self, k: int) -> list:
        if k not in self.masks:
            self.masks[k] = self._mask_outputs(f"{MASKS}/{numbered(k, len(self.names), self.names[k], '')}",
                                               self.frames)
        return self.masks[k]

    def write(self, image: np.ndarray, labels: np.ndarray, objects: list | None) -> None:
        from .render import color_labels, overlay, render_tracks

        self.items[0].write(overlay(image, color_labels(labels, len(self.names))))
        for k in (int(v) for v in np.unique(labels) if v >= 0):
            self._class_outputs(k)
        for k, outs in self.masks.items():
            mask = ((labels == k) * 255).astype(np.uint8)
            for o in outs:
                o.write(mask)
        if self.tracks is not None:
            self.tracks.write(render_tracks(image, objects))
        self.frames += 1

    def _done(self, outs: list) -> None:
        for o in outs:
            o.close()
            self.items.remove(o)

    def write_objects(self, result) -> None:
        """One mask video (and PNG frames) per tracked object, a track at a time, a frame at a time."""
        count = max((t.id for t in result.tracks), default=0) + 1
        for t in result.tracks:
            outs = self._mask_outputs(f"{INSTANCES}/{numbered(t.id, count, t.class_name, '')}", 0)
            for k in range(result.num_frames):
                mask = t.mask(k, result.size).astype(np.uint8) * 255
                for o in outs:
                    o.write(mask)
            self._done(outs)

    def close(self) -> None:
        for k in range(len(self.names)):  # the classes that never appeared: empty videos, one at a time
            if k not in self.masks:
                self._done(self._class_outputs(k))
        for o in self.items:
            o.close()
        self.items = []

    def abort(self) -> None:
        for o in self.items:
            o.abort()
        self.items = []


def segment_video(args: argparse.Namespace) -> int:
    """Segment a clip frame by frame and write its outputs (see the module's docstring). A run that fails leaves
    --out as it was: a folder it made is removed again if still empty; a full disk says what to do."""
    from .paths import require_output_folder

    path = _check_args(args)
    clip = open_clip(path, args.fps or FOLDER_FPS)  # an unreadable clip is an error before the models load
    check_video_size(clip.size, f"the clip {path}")
    out = Path(args.out)
    check_opencv_path(out, "--out")
    made = [p for p in (out.absolute(), *out.absolute().parents) if not os.path.lexists(p)]  # deepest first
    require_output_folder(out, "--out")
    try:
        return _segment_clip(args, path, clip, out)
    except BaseException as e:
        with suppress(OSError):
            for folder in made:
                folder.rmdir()  # (only if empty: a concurrent run's files stay, and the folders above them)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise OSError(e.errno, f"{e.strerror} while writing the clip's outputs: make room or choose another "
                          "--out, then run the same command again") from e
        raise


def _segment_clip(args: argparse.Namespace, path: Path, clip: Clip, out: Path) -> int:
    """`segment_video` once the clip is open and --out exists."""
    from .batch import ProgressBar, settings_key
    from .classes import named_classes
    from .cli import _settings, build_trident, classes_from_args, encode_text, params_from_args, release_text_tower
    from .flow import Flow, FlowStream
    from .temporal import TemporalSmoother
    from .tracking import ObjectTracker

    classes = classes_from_args(args)
    params = params_from_args(args)
    wanted = named_classes(classes, args.instances) if args.instances is not None else None
    min_area = args.min_area  # (checked with the other options: cli._instance_options)
    protected = _inputs(path)
    check_planned(out, clip_planned(classes.names, wanted is not None, args.png_frames), protected,
                  (INSTANCES,) if wanted is not None else ())
    tr = build_trident(args, params)
    encode_text(tr, classes)
    release_text_tower(tr.clip)
    per_forward = tr.frames_per_forward(params, clip.size)  # several frames per forward on a GPU; 1 on the CPU
    tr.release_weights = per_forward == 1  # the CPU's peak holds one stage's weights (residency.py)
    settings = _settings(tr, classes, params) | {
        "clip": os.fspath(path), "smooth": args.smooth, "png_frames": bool(args.png_frames),
        **({"instances": args.instances, "min_area": min_area, "max_gap": args.max_gap,
            "max_objects": args.max_objects} if wanted is not None else {})}
    smoother = TemporalSmoother(args.smooth, params.classification.prob_thd)
    tracker = ObjectTracker(wanted, classes.names, min_area, args.max_gap) if wanted is not None else None
    flows = FlowStream() if tracker is not None or args.smooth else None
    remove_partials(out / "outputs")
    if video_size(clip.size) != clip.size:
        (h, w), (vh, vw) = clip.size, video_size(clip.size)
        print(f"note: the frames are {w}x{h}; the videos are {vw}x{vh} (MPEG-4 takes even sizes: the last "
              f"{'row' if vh != h else 'column'}{' and column' if vh != h and vw != w else ''} repeated)"
              f"{f', the PNG frames {w}x{h}' if args.png_frames else ''}", file=sys.stderr)
    tmp = fresh_folder(partial_name(out / "outputs"))
    writers = None
    try:
        writers = _ClipWriters(tmp, classes.names, args.fps or clip.fps, clip.size, args.png_frames,
                               tracker is not None)
        bar = ProgressBar(max(clip.frames, 1), "video")
        t0 = time.perf_counter()
        frames = 0
        read: deque[tuple[np.ndarray, Flow | None]] = deque()  # frames read, with their flow, not yet written
        to_smooth: deque[Flow | None] = deque()  # their flows, for the smoothing after each frame's classification

        def source() -> Iterator[np.ndarray]:
            for frame in clip:
                flow = flows.push(frame) if flows is not None else None
                read.append((frame, flow))
                to_smooth.append(flow)
                yield frame

        segs = tr.segment_frames(source(), classes, params, after_classify=lambda s: smoother(s, to_smooth.popleft()),
                                 per_forward=per_forward)
        for frames, seg in enumerate(segs, 1):
            frame, flow = read.popleft()
            labels = seg.labels.cpu().numpy()
            objects = tracker.push(labels, seg.probs, flow, frame) if tracker is not None else None
            writers.write(frame, labels, objects)
            del seg
            bar.total = max(bar.total, frames)
            bar.update(frames, frames, f"frame {frames - 1}")
        bar.close()
        if tracker is not None:
            result, dropped = tracker.result().largest(args.max_objects)
            if dropped:
                print(f"instances: kept the {args.max_objects} objects covering the most pixels over the clip, "
                      f"dropped {dropped} smaller ones (raise --max-objects to keep more)", file=sys.stderr)
            writers.write_objects(result)
            write_atomic(tmp / TRACKS_JSON, result.to_json().encode())
        writers.close()
        place_outputs(tmp, out, settings_key(settings), settings | {"frames": frames}, protected)
    finally:
        if writers is not None:
            writers.abort()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{frames} frames segmented in {time.perf_counter() - t0:.1f}s"
          + (f", {len(result.tracks)} objects tracked" if tracker is not None else "") + f" -> {out}",
          file=sys.stderr, flush=True)
    return 0
