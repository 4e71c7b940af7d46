"""Hostile probes of clip runs (`segment CLIP --out DIR`, trident_core.video_run) and the tracker: each test asserts
the promised behaviour (issues #21 and #22) where the code falls short of it."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from test_tracking import MIN_AREA, track
from test_video_cli import frame_folder, models
from video_scenes import identity_measure, scenes

from trident_core.cli import main

CLASSES = "disc, square"


def crossing(size=(48, 64)) -> list[np.ndarray]:
    return [img for img, _, _ in scenes(size)["crossing"].render()]


def run(small_ckpts, clip: Path, out: Path, *extra: str) -> int:
    return main(["segment", str(clip), "--classes", CLASSES, "--out", str(out), *extra, *models(small_ckpts)])


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_max_objects_caps_the_tracked_objects_of_a_clip(small_ckpts, tmp_path):
    # #21 bounded work: --max-objects caps the objects of a clip run too (it is silently ignored there)
    import json

    frames = frame_folder(crossing()[10:18], tmp_path / "frames")
    assert run(small_ckpts, frames, tmp_path / "all", "--video", "--instances", "--min-area", "1") == 0
    assert len(json.loads((tmp_path / "all" / "tracks.json").read_text())) >= 2  # (more than the cap below)
    assert run(small_ckpts, frames, tmp_path / "one", "--video", "--instances", "--min-area", "1",
               "--max-objects", "1") == 0
    assert len(json.loads((tmp_path / "one" / "tracks.json").read_text())) <= 1


def test_a_truncated_video_file_is_an_error_not_a_shorter_clip(small_ckpts, tmp_path, capsys):
    # #21/#22: a file that does not decode completely is unreadable (one line naming it), never a shorter clip, exit 0
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 12.0, (64, 48))
    for f in crossing():
        w.write(np.ascontiguousarray(f[..., ::-1]))
    w.release()
    data = video.read_bytes()
    video.write_bytes(data[:len(data) // 2])  # an interrupted copy: its header still says 36 frames
    out = tmp_path / "out"
    assert run(small_ckpts, video, out) == 2
    assert "clip.avi" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / "overlay.mp4").exists()


def test_a_gif_declaring_a_huge_canvas_is_one_line(small_ckpts, tmp_path, capsys):
    # #22 bad input is one clear line: a decompression bomb GIF must not end in a PIL traceback (exit 1)
    frames = [Image.fromarray(f) for f in crossing()[:3]]
    gif = tmp_path / "bomb.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = bytearray(gif.read_bytes())
    data[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen: 4.3 gigapixels
    gif.write_bytes(bytes(data))
    assert run(small_ckpts, gif, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bomb.gif" in err.strip().splitlines()[-1]


def test_a_dangling_frame_in_a_folder_clip_is_not_silently_dropped(small_ckpts, tmp_path, capsys):
    # #21/#22: every entry a folder run skips is reported; a missing frame must not shift the clip (exit 0, 7 frames)
    frames = frame_folder(crossing()[10:18], tmp_path / "frames")
    (frames / "f3.png").unlink()
    (frames / "f3.png").symlink_to(tmp_path / "gone.png")  # a frame lost in a copy
    out = tmp_path / "out"
    rc = run(small_ckpts, frames, out, "--video")
    err = capsys.readouterr().err
    assert rc == 2 and "f3.png" in err.strip().splitlines()[-1]


def test_old_outputs_are_never_deleted_through_a_linked_folder(small_ckpts, tmp_path):
    # #21: only files we can prove we wrote are deleted: never through a link, whatever its depth in the path
    frames = frame_folder(crossing()[10:18], tmp_path / "frames")
    out = tmp_path / "out"
    assert run(small_ckpts, frames, out, "--video", "--instances", "--png-frames") == 0
    kept = tmp_path / "kept"  # the user keeps the objects elsewhere, a link left in their place
    shutil.move(out / "instances", kept)
    (out / "instances").symlink_to(kept)
    before = tree(kept)
    assert any("/" in name for name in before)  # (PNG frames in per-object folders)
    run(small_ckpts, frames, out, "--video")  # the same --out without --instances
    assert tree(kept) == before


def test_an_object_coming_back_into_view_keeps_its_id():
    # #22 tracking: an object re-found after a short absence keeps its id, no identity switch (72x96, 3 frames)
    scene = scenes((72, 96), gap=3)["leave_and_return"]
    frames, result, per_frame = track(scene)
    m = identity_measure([t for *_, t in frames], per_frame, MIN_AREA)
    assert m["returns"] >= 1
    assert m["switches"] == 0 and len(result.tracks) == len(scene.shapes)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))


def test_a_write_error_while_encoding_is_not_exit_0_with_a_truncated_video(small_ckpts, tmp_path):
    # #21 a failed run leaves --out as it was: a video cut short by a full disk is never put in place, exit 0
    frames = frame_folder(crossing(), tmp_path / "frames")  # 36 frames: the overlay is ~20 KB, the rest < 8 KB
    out = tmp_path / "out"
    env = os.environ | {"TRIDENT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "trident_core", "segment", str(frames), "--video", "--classes", CLASSES, "--out",
           str(out), *models(small_ckpts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_limit_file_size,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (out / "overlay.mp4").exists()


def test_a_users_own_trident_json_is_not_replaced(small_ckpts, tmp_path):
    # #21: we replace only what we can prove we wrote: a trident.json that is not our marker is the user's
    frames = frame_folder(crossing()[10:14], tmp_path / "frames")
    out = tmp_path / "out"
    out.mkdir()
    (out / "trident.json").write_text('{"project": "my own notes about trident"}')
    run(small_ckpts, frames, out, "--video")
    assert (out / "trident.json").read_text() == '{"project": "my own notes about trident"}'
