"""`segment` on a clip (trident_core.video_run) with the small random-weight models: the files it promises, each
frame's masks equal to that frame segmented alone (smoothing off), tracked objects consistent with the class
masks, and bad clips or an --out holding other files refused in one line, nothing of the user's replaced."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from video_scenes import scenes

from trident_core.cli import main
from trident_core.config import Params
from trident_core.video_io import VideoWriter, open_clip

CLASSES = "disc, square"


@pytest.fixture(scope="module")
def clip_frames() -> list[np.ndarray]:
    return [img for img, _, _ in scenes((48, 64))["crossing"].render()[14:18]]


FAST = Params().update(paradigm="segment_then_splice", short_side=32)  # no SAM: seconds per clip, not minutes


def models(small_ckpts) -> list[str]:
    return ["--clip", str(small_ckpts["clip"]), "--dino", str(small_ckpts["dino"]), "--sam", str(small_ckpts["sam"]),
            "--device", "cpu", "--no-download", "--paradigm", FAST.aggregation.paradigm, "--short-side",
            str(FAST.windows.short_side)]


def frame_folder(frames: list[np.ndarray], folder: Path) -> Path:
    folder.mkdir()
    for k, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"f{k}.png")
    return folder


def pngs(folder: Path) -> np.ndarray:
    return np.stack([np.array(Image.open(p)) for p in sorted(folder.iterdir())]) > 0


def test_a_folder_clip_with_objects(small_ckpts, small_trident, clip_frames, tmp_path, capsys):
    frames = frame_folder(clip_frames, tmp_path / "frames")
    out = tmp_path / "out"
    rc = main(["segment", str(frames), "--video", "--classes", CLASSES, "--out", str(out), "--instances", "disc",
               "--min-area", "4", "--png-frames", "--fps", "8", *models(small_ckpts)])
    assert rc == 0
    assert "4 frames segmented" in capsys.readouterr().err
    marker = json.loads((out / "trident.json").read_text())
    assert {p.name for p in out.iterdir()} == {"overlay.mp4", "masks", "instances", "tracks.json", "tracks.mp4",
                                               "trident.json"}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"trident.json"}
    assert marker["key"] and set(marker["files"]) == set(marker["sha256"]) == written  # every file listed
    assert all(hashlib.sha256((out / f).read_bytes()).hexdigest() == d for f, d in marker["sha256"].items())
    assert Image.open(out / "masks" / "000_disc" / "000000.png").info["Software"] == "ComfyUI-Trident"
    n = len(clip_frames)
    for video in ("overlay.mp4", "tracks.mp4"):
        clip = open_clip(out / video)
        assert (clip.frames, clip.size, clip.fps) == (n, (48, 64), 8.0)
    classes = [pngs(out / "masks" / name) for name in ("000_disc", "001_square")]
    assert all(c.shape == (n, 48, 64) for c in classes)
    assert not (classes[0] & classes[1]).any()
    for k, frame in enumerate(clip_frames):  # smoothing off: each frame as it is alone
        alone = small_trident.segment(frame, CLASSES, FAST).labels.numpy()
        assert np.array_equal(classes[0][k], alone == 0) and np.array_equal(classes[1][k], alone == 1)
    for name in ("000_disc", "001_square"):
        video = np.stack([f[..., 0] >= 128 for f in open_clip(out / "masks" / f"{name}.mp4")])
        assert np.array_equal(video, pngs(out / "masks" / name))
    tracks = json.loads((out / "tracks.json").read_text())
    union = np.zeros_like(classes[0])
    for t in tracks:
        stem = f"{t['id']:03d}_{t['class']}"
        masks = pngs(out / "instances" / stem)
        assert t["class"] == "disc" and masks.shape == (n, 48, 64)
        assert not (masks & ~classes[0]).any() and not (masks & union).any()
        union |= masks
        for rec in t["frames"]:
            x1, y1, x2, y2 = rec["box"]
            m = masks[rec["frame"]]
            assert rec["area"] == m.sum() == m[y1:y2, x1:x2].sum()
        assert {r["frame"] for r in t["frames"]} == {k for k in range(n) if masks[k].any()}
    assert sorted(p.name for p in (out / "instances").iterdir() if p.suffix == ".mp4") == \
        [f"{t['id']:03d}_disc.mp4" for t in tracks]


def test_a_video_file_with_smoothing_then_again_without_objects(small_ckpts, clip_frames, tmp_path):
    video = tmp_path / "clip.mp4"
    with VideoWriter(video, 12.0, (48, 64)) as w:
        for f in clip_frames:
            w.write(f)
    out = tmp_path / "out"
    common = ["segment", str(video), "--classes", CLASSES, "--out", str(out), *models(small_ckpts)]
    assert main([*common, "--smooth", "0.6", "--instances", "--fps", "6"]) == 0
    assert (out / "instances").is_dir() and open_clip(out / "masks" / "001_square.mp4").frames == len(clip_frames)
    assert open_clip(out / "overlay.mp4").fps == 6.0  # (the clip's own 12 unless --fps)
    (out / "mine.txt").write_text("a file of the user's")
    (out / "instances" / "mine.png").write_bytes(b"the user's too")
    assert main(common) == 0  # the same --out again: the earlier run's files are replaced, its objects removed
    assert {p.name for p in out.iterdir()} == {"overlay.mp4", "masks", "trident.json", "mine.txt", "instances"}
    assert [p.name for p in (out / "instances").iterdir()] == ["mine.png"]  # only what the marker listed went
    assert json.loads((out / "trident.json").read_text())["settings"]["smooth"] == 0.0


def test_bad_clips_and_options_are_one_line(small_ckpts, clip_frames, tmp_path, capsys):
    def run(*argv: str) -> str:
        assert main(["segment", *argv, "--classes", CLASSES, *models(small_ckpts)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "models loaded" not in err  # refused before the models load
        return err.strip().splitlines()[-1]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no frames" in run(str(empty), "--video", "--out", str(tmp_path / "o1"))
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    assert "fake.mp4" in run(str(fake), "--out", str(tmp_path / "o2"))
    assert "--save-npz" in run(str(fake), "--out", str(tmp_path / "o3"), "--save-npz", str(tmp_path / "x.npz"))
    assert "one video file" in run(str(empty), str(fake), "--video", "--out", str(tmp_path / "o4"))
    assert "strength" in run(str(fake), "--out", str(tmp_path / "o5"), "--smooth", "1.5")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "overlay.mp4").write_bytes(b"the user's own video")
    frames = frame_folder(clip_frames, tmp_path / "frames")
    assert "overlay.mp4 is not a file Trident wrote" in run(str(frames), "--video", "--out", str(taken))
    assert (taken / "overlay.mp4").read_bytes() == b"the user's own video"
    (taken / "trident.json").write_text("{damaged")  # a marker that cannot be read proves nothing, nor is it ours
    assert "trident.json is not a marker Trident wrote" in run(str(frames), "--video", "--out", str(taken))
    assert (taken / "overlay.mp4").read_bytes() == b"the user's own video"
    own = tmp_path / "own"
    own.mkdir()
    with VideoWriter(own / "overlay.mp4", 12.0, (48, 64)) as w:  # the clip itself where an output would go
        for f in clip_frames:
            w.write(f)
    assert "would replace the input" in run(str(own / "overlay.mp4"), "--out", str(own))
    assert open_clip(own / "overlay.mp4").frames == len(clip_frames)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "instances").write_text("the user's notes")  # (found only after the whole clip was segmented)
    assert "instances is not a folder Trident wrote" in run(str(frames), "--video", "--instances", "--out",
                                                            str(blocked))
    assert (blocked / "instances").read_text() == "the user's notes"
    tiny = frame_folder([f[:4, :4] for f in clip_frames], tmp_path / "tiny")  # (the encoder aborted the process)
    assert "frames of 4x4 pixels: too small for a video" in run(str(tiny), "--video", "--out", str(tmp_path / "o6"))
    assert not (tmp_path / "o6").exists()


def test_odd_sized_frames_give_videos_padded_by_one_and_say_so(small_ckpts, clip_frames, tmp_path, capsys):
    """A 63x47 clip's videos were 62x46, its last row and column cut (a mask off by a pixel in a compositor)."""
    frames = frame_folder([f[:47, :63] for f in clip_frames], tmp_path / "frames")
    out = tmp_path / "out"
    assert main(["segment", str(frames), "--video", "--classes", CLASSES, "--out", str(out), "--png-frames",
                 *models(small_ckpts)]) == 0
    assert ("note: the frames are 63x47; the videos are 64x48 (MPEG-4 takes even sizes: the last row and column "
            "repeated), the PNG frames 63x47") in capsys.readouterr().err
    for video in [out / "overlay.mp4", *(out / "masks").glob("*.mp4")]:
        assert open_clip(video).size == (48, 64)
    for folder in (p for p in (out / "masks").iterdir() if p.is_dir()):
        png = pngs(folder)
        assert png.shape[1:] == (47, 63)
        back = np.stack(list(open_clip(folder.with_suffix(".mp4"))))[..., 0] >= 128
        assert np.array_equal(back[:, :47, :63], png) and np.array_equal(back[:, 47, :63], png[:, 46])


def test_a_frame_of_another_size_stops_the_run_leaving_out_as_it_was(small_ckpts, clip_frames, tmp_path, capsys):
    frames = frame_folder(clip_frames, tmp_path / "frames")
    out = tmp_path / "out"
    common = ["segment", str(frames), "--video", "--classes", CLASSES, "--out", str(out), *models(small_ckpts)]
    assert main([*common, "--instances"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    Image.fromarray(clip_frames[0][:40]).save(frames / "f9.png")
    assert main(common) == 2
    assert "f9.png is 64x40 pixels" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier run's files intact


def test_class_videos_open_when_their_class_appears(tmp_path):
    """A class first seen in frame 2 gets empty frames 0 and 1; one never seen gets an empty video at the end."""
    from trident_core.video_run import _ClipWriters

    writers = _ClipWriters(tmp_path, ["a", "b", "c"], 10.0, (16, 20), png=True, tracks=False)
    labels = [np.zeros((16, 20), np.int64) for _ in range(4)]
    labels[2][4:9, 5:12] = 1
    image = np.zeros((16, 20, 3), np.uint8)
    for lab in labels:
        writers.write(image, lab, None)
    assert sorted(writers.masks) == [0, 1]  # (c has no encoder open)
    writers.close()
    for k, name in enumerate(["000_a", "001_b", "002_c"]):
        want = np.stack([lab == k for lab in labels])
        assert np.array_equal(pngs(tmp_path / "masks" / name), want)
        video = np.stack([f[..., 0] >= 128 for f in open_clip(tmp_path / "masks" / f"{name}.mp4")])
        assert np.array_equal(video, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "overlay.mp4"]


@pytest.mark.parametrize("name, ours", [
    ("overlay.mp4", True), ("tracks.json", True), ("masks/000_disc.mp4", True), ("instances/1234_disc.mp4", True),
    ("masks/000_disc/000000.png", True), ("masks/000_disc/000000.jpg", False), ("masks/000_disc/x/000000.png", False),
    ("masks/00_disc.mp4", False), ("masks/000_a b.mp4", False), ("holiday.mp4", False), ("masks/000_../000000.png",
                                                                                          False)])
def test_a_marker_is_believed_only_for_names_a_clip_run_writes(name, ours):
    from trident_core.marker import is_output_name

    assert is_output_name(name) is ours


def _without_confidence(value: object) -> object:
    """tracks.json without its confidences (float32 rounding may differ with frames sharing forwards)."""
    if isinstance(value, dict):
        return {k: _without_confidence(v) for k, v in value.items() if k != "confidence"}
    return [_without_confidence(v) for v in value] if isinstance(value, list) else value


def _confidences(value: object) -> list[float]:
    if isinstance(value, dict):
        return [value.get("confidence", 0.0)] + [c for v in value.values() for c in _confidences(v)]
    return [c for v in value for c in _confidences(v)] if isinstance(value, list) else []


def test_frames_sharing_forwards_write_what_one_frame_at_a_time_writes(small_ckpts, clip_frames, tmp_path, monkeypatch):
    """A clip run where frames share forwards (as on a GPU; forced here, 3 at a time over 4 frames): the same masks,
    objects and tracks as one frame at a time, the smoothing and the tracker fed each frame's own flow in order."""
    from trident_core.pipeline import Trident

    frames = frame_folder(clip_frames, tmp_path / "frames")
    common = ["segment", str(frames), "--video", "--classes", CLASSES, "--instances", "--min-area", "4",
              "--png-frames", "--smooth", "0.5", *models(small_ckpts)]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    groups = []
    group = Trident._segment_group
    monkeypatch.setattr(Trident, "frames_per_forward", lambda self, params, size, free=None: 3)
    monkeypatch.setattr(Trident, "_segment_group", lambda self, imgs, *a: groups.append(len(imgs)) or group(
        self, imgs, *a))
    assert main([*common, "--out", str(tmp_path / "shared")]) == 0
    assert groups == [3, 1]
    one, shared = tmp_path / "one", tmp_path / "shared"
    for name in ("000_disc", "001_square"):
        assert np.array_equal(pngs(one / "masks" / name), pngs(shared / "masks" / name))
    alone, together = (json.loads((d / "tracks.json").read_text()) for d in (one, shared))
    assert _without_confidence(alone) == _without_confidence(together)  # ids, classes, frames, boxes, areas
    assert np.allclose(_confidences(alone), _confidences(together), atol=1e-5)  # (a kernel timed per batch shape)
    assert sorted(p.name for p in (one / "instances").iterdir()) == sorted(p.name
                                                                           for p in (shared / "instances").iterdir())


def test_videos_given_as_images_are_named_as_clips(clip_frames, tmp_path, capsys):
    """A glob of videos said only "no image file matches", a video of an unknown kind only "not an image format"."""
    for name in ("a.mp4", "b.mp4"):
        with VideoWriter(tmp_path / name, 12.0, (48, 64)) as w:
            for f in clip_frames:
                w.write(f)
    (tmp_path / "c.mpg").write_bytes((tmp_path / "a.mp4").read_bytes())
    common = ["--classes", CLASSES, "--out", str(tmp_path / "out"), "--clip", "none.pt", "--no-download"]
    assert main(["segment", str(tmp_path / "*.mp4"), *common]) == 2
    assert "2 video clip(s) do: give one clip per command" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "c.mpg"), *common]) == 2
    assert "video clips: .mp4 .webm" in capsys.readouterr().err


def test_videos_in_a_folder_of_images_are_named_not_skipped_silently(clip_frames, tmp_path, capsys, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    with VideoWriter(folder / "a.mp4", 12.0, (48, 64)) as w:
        for f in clip_frames:
            w.write(f)
    common = ["--classes", CLASSES, "--out", str(tmp_path / "out"), "--clip", "none.pt", "--no-download"]
    assert main(["segment", str(folder), *common]) == 2
    assert "1 video clip(s) there are not images: give each clip as its own command" in capsys.readouterr().err
    Image.fromarray(clip_frames[0]).save(folder / "x.png")
    assert main(["segment", str(folder), *common]) == 2  # (the made-up CLIP file, after the inputs)
    assert "none.pt" in capsys.readouterr().err
    assert f"{folder}: 1 video clip(s) there are not images" in caplog.text  # (`trident` shows it as one line)


def test_animated_gifs_among_images_are_said_to_give_their_first_frame(clip_frames, tmp_path, caplog):
    """A folder or pattern segmented an animated GIF as one image without a word (an .mp4 there was named)."""
    from trident_core.image_list import gather

    folder = tmp_path / "mixed"
    folder.mkdir()
    first, *rest = [Image.fromarray(f) for f in clip_frames]
    first.save(folder / "anim.gif", save_all=True, append_images=rest, duration=100)
    first.save(folder / "still.gif")
    Image.fromarray(clip_frames[0]).save(folder / "x.png")
    for arg in (str(folder), str(folder / "*.gif")):
        caplog.clear()
        jobs, _ = gather([arg])
        assert len(jobs) == (3 if arg == str(folder) else 2)
        lines = [r.getMessage() for r in caplog.records if "animated" in r.getMessage()]
        assert len(lines) == 1 and "1 animated GIF/WebP file(s) (anim.gif) are segmented as their first" in lines[0]


def test_a_rerun_given_an_earlier_output_as_its_clip_keeps_it(small_ckpts, clip_frames, tmp_path, capsys):
    """The clip was an output the old marker listed and this run does not write again (tracks.mp4 without
    --instances): the rerun deleted its own input."""
    frames = frame_folder(clip_frames, tmp_path / "frames")
    out = tmp_path / "out"
    assert main(["segment", str(frames), "--video", "--classes", CLASSES, "--out", str(out), "--instances", "disc",
                 "--min-area", "4", *models(small_ckpts)]) == 0
    tracks = out / "tracks.mp4"
    before = tracks.read_bytes()
    assert main(["segment", str(tracks), "--classes", CLASSES, "--out", str(out), *models(small_ckpts)]) == 0
    assert tracks.read_bytes() == before
    assert not (out / "instances").exists() and (out / "overlay.mp4").is_file()
