"""Clips in and out (trident_core.video_io): round trips through the writers and each reader, natural frame order,
and one clear error naming the file and the frame for every kind of bad clip."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import Image
from video_scenes import scenes

from trident_core import video_io
from trident_core.video_io import FrameFolder, VideoError, VideoWriter, is_clip, open_clip


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [img for img, _, _ in scenes((48, 64))["crossing"].render()[:6]]


def test_video_round_trip(frames, tmp_path):
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, 12.0, frames[0].shape[:2]) as w:
        for f in frames:
            w.write(f)
    assert is_clip(path) and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    clip = open_clip(path)
    assert (clip.size, clip.frames, clip.fps) == ((48, 64), 6, 12.0)
    back = list(clip)
    assert len(back) == 6 and all(b.dtype == np.uint8 and b.shape == (48, 64, 3) for b in back)
    for a, b in zip(frames, back):  # MPEG-4 is lossy, the colours stay (RGB order kept)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 12


def test_binary_masks_survive_the_video_codec(tmp_path):
    yy, xx = np.mgrid[0:60, 0:90]
    masks = [(((xx - 20 - 5 * k) ** 2 + (yy - 30) ** 2) < 15 ** 2).astype(np.uint8) * 255 for k in range(8)]
    with VideoWriter(tmp_path / "m.mp4", 24.0, (60, 90), color=False) as w:
        for m in masks:
            w.write(m)
    back = list(open_clip(tmp_path / "m.mp4"))
    assert all(np.array_equal(b[..., 0] >= 128, m > 0) for b, m in zip(back, masks))


@pytest.mark.parametrize("ext", [".gif", ".webp"])
def test_animated_images_are_clips(frames, tmp_path, ext):
    path = tmp_path / f"a{ext}"
    pil = [Image.fromarray(f) for f in frames]
    extra = {"lossless": True} if ext == ".webp" else {}
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=50, loop=0, **extra)
    clip = open_clip(path)
    assert is_clip(path) and (clip.size, clip.frames, clip.fps) == ((48, 64), 6, 20.0)
    back = list(clip)
    if ext == ".webp":
        assert all(np.array_equal(a, b) for a, b in zip(frames, back))
    else:  # a GIF has a palette of 256 colours
        assert len(back) == 6 and all(np.abs(a.astype(int) - b.astype(int)).mean() < 12 for a, b in zip(frames, back))
    single = tmp_path / f"one{ext}"
    pil[0].save(single)
    assert not is_clip(single)


@pytest.mark.parametrize("ext", [".gif", ".webp"])
def test_an_animations_frame_rate_is_its_frames_over_its_length(frames, tmp_path, ext):
    """A GIF holding its first frame for 2 s then 40 ms per frame lasts 2.2 s: its fps came from the first frame
    alone (0.5 fps: a 12 s video)."""
    path = tmp_path / f"a{ext}"
    pil = [Image.fromarray(f) for f in frames]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=[2000] + [40] * 5, loop=0)
    clip = open_clip(path)
    assert clip.frames == 6 and clip.fps == pytest.approx(6 / 2.2)


@pytest.mark.parametrize("size", [(47, 65), (48, 17), (17, 16)])
def test_odd_sized_frames_keep_their_last_row_and_column(size, tmp_path):
    """MPEG-4 takes even sizes: an odd frame's video was cut by its last row or column (a mask one pixel off the
    image it masks). It is padded by one now, that row or column repeated."""
    h, w = size
    mask = np.zeros(size, np.uint8)
    mask[-1, :] = mask[:, -1] = 255
    with VideoWriter(tmp_path / "m.mp4", 10.0, size, color=False) as vw:
        for _ in range(3):
            vw.write(mask)
    back = list(open_clip(tmp_path / "m.mp4"))
    assert len(back) == 3 and back[0].shape[:2] == (h + h % 2, w + w % 2)
    grey = back[0][..., 0] >= 128
    assert grey[:h, w - 1].all() and grey[h - 1, :w].all() and not grey[:h - 1, :w - 1].any()


@pytest.mark.parametrize("size", [(4, 4), (20, 4), (1, 64)])
def test_frames_too_small_for_a_video_are_refused_before_the_encoder(size, tmp_path):
    """OpenCV's MPEG-4 encoder aborted the whole process (free(): invalid next size) on 4x4 grey frames."""
    with pytest.raises(ValueError, match="too small for a video"):
        VideoWriter(tmp_path / "m.mp4", 10.0, size, color=False)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_is_read_in_natural_order(frames, tmp_path):
    for k, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"frame{k * 5}.png")  # frame0, frame5, frame10, ...
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub").mkdir()
    Image.fromarray(frames[0]).save(tmp_path / "sub" / "frame1.png")
    clip = open_clip(tmp_path, folder_fps=30)
    assert (clip.frames, clip.fps, clip.size) == (6, 30, (48, 64))
    assert all(np.array_equal(a, b) for a, b in zip(frames, clip))


def test_png_frames_appear_complete(tmp_path):
    seq = FrameFolder(tmp_path / "masks" / "000_a")
    for k in range(3):
        seq.write(np.full((4, 5), 80 * k, np.uint8))
    assert not (tmp_path / "masks" / "000_a").exists()
    seq.close()
    names = sorted(p.name for p in (tmp_path / "masks" / "000_a").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png"]
    assert np.array(Image.open(tmp_path / "masks" / "000_a" / "000002.png")).max() == 160
    aborted = FrameFolder(tmp_path / "x")
    aborted.write(np.zeros((4, 5), np.uint8))
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]


def test_an_interrupted_video_leaves_no_file(frames, tmp_path):
    with pytest.raises(RuntimeError), VideoWriter(tmp_path / "v.mp4", 10, (48, 64)) as w:
        w.write(frames[0])
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    with VideoWriter(tmp_path / "v.mp4", 10, (48, 64)) as w, pytest.raises(ValueError, match="a 48x32 frame"):
        w.write(frames[0][:32, :48])


def test_bad_clips_are_one_line_naming_file_and_frame(frames, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="empty: no frames"):
        open_clip(empty)
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(VideoError, match="fake.mp4: cannot open it as a video|fake.mp4: no frame"):
        open_clip(fake)
    with pytest.raises(VideoError, match="no such video"):
        open_clip(tmp_path / "missing.mp4")
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, f in enumerate(frames[:3]):
        Image.fromarray(f if k != 2 else f[:40]).save(folder / f"{k}.png")
    with pytest.raises(VideoError, match=r"2\.png is 64x40 pixels, the clip's first frame 0\.png 64x48"):
        open_clip(folder)  # (from the frames' headers, before a model loads)
    (folder / "3.png").write_bytes(b"broken")
    (folder / "2.png").unlink()
    with pytest.raises(VideoError, match=r"frame .*3\.png"):
        list(open_clip(folder))
    monkeypatch.setattr(video_io, "MAX_PIXELS", 1000)
    path = tmp_path / "big.mp4"
    with VideoWriter(path, 10, (48, 64)) as w:
        w.write(frames[0])
    with pytest.raises(VideoError, match="megapixels"):
        open_clip(path)
    for err in (VideoError("x"),):
        assert str(err).count("\n") == 0


def test_a_folders_bad_frame_is_refused_when_the_clip_opens(frames, tmp_path, monkeypatch):
    """A file that is no image, or a frame of another size, late in a folder: refused from the headers when the
    clip is opened, before any frame is decoded (it was found only when the run reached it, its work lost)."""
    for k, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{k}.png")
    decoded = []
    monkeypatch.setattr(video_io, "read_image", lambda f: decoded.append(f))
    (tmp_path / "5.png").write_text("not an image")
    with pytest.raises(VideoError, match=r"frame .*5\.png: cannot read image"):
        open_clip(tmp_path)
    Image.fromarray(frames[5][:, :60]).save(tmp_path / "5.png")
    with pytest.raises(VideoError, match=r"5\.png is 60x48 pixels, the clip's first frame 0\.png 64x48"):
        open_clip(tmp_path)
    assert decoded == []


def _avi(frames: list[np.ndarray], path) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 12.0, (64, 48))
    for f in frames:
        w.write(np.ascontiguousarray(f[..., ::-1]))
    w.release()


def test_a_matroska_clip_short_of_its_estimated_count_is_a_warning(frames, tmp_path, monkeypatch, caplog):
    """WebM's and Matroska's frame counts are FFmpeg's estimates from the container's duration, which a longer
    audio track sets: all frames decoded but fewer than estimated is a warning, not "cut short" after the whole
    run. A container that counts its frames (AVI, MP4) still is an error."""
    _avi(frames, tmp_path / "clip.avi")
    (tmp_path / "clip.mkv").write_bytes((tmp_path / "clip.avi").read_bytes())  # (FFmpeg reads the content)
    info = video_io._video_info
    monkeypatch.setattr(video_io, "_video_info", lambda p: (info(p)[0], len(frames) + 10))  # the estimate
    with caplog.at_level("WARNING", logger="trident_core"):
        got = list(open_clip(tmp_path / "clip.mkv"))
    assert len(got) == len(frames)
    assert "6 frames decoded of the 16 its container's duration suggests" in caplog.text
    with pytest.raises(VideoError, match="6 of the 16 frames its header declares: the file is cut short"):
        list(open_clip(tmp_path / "clip.avi"))


def test_too_many_open_files_is_said_and_the_limit_raised(tmp_path):
    """Out of file descriptors (a clip where hundreds of classes appear), a video writer says so and what to do,
    not "no MPEG-4 encoder"; a clip's writers raise the soft limit to hold a video per class."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 6, hard))
        with pytest.raises(OSError, match=r"cannot write the video .*Too many open files .*ulimit -n"):
            for k in range(40):
                held.append(VideoWriter(tmp_path / f"{k}.mp4", 10.0, (48, 64)))
        for w in held:
            w.abort()
        held = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        video_io.allow_open_files(1000)
        want = 1000 + video_io.OPEN_FILES_MARGIN
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (want if hard == resource.RLIM_INFINITY
                                                                 else min(hard, want))
    finally:
        for w in held:
            w.abort()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_encoder_that_fails_after_making_its_file_is_said_and_leaves_nothing(tmp_path, monkeypatch):
    """OpenCV's writer can make its file and still not open (no mp4v encoder in that build): the one line names the
    encoder, not "File exists" (the file it left), and no file stays behind."""

    class Failing:
        def __init__(self, name: str, *args, **kwargs) -> None:
            open(name, "wb").close()

        def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
            return False

    monkeypatch.setattr(video_io.cv2, "VideoWriter", Failing)
    with pytest.raises(OSError, match=r"cannot write the video .*m\.mp4: this OpenCV has no MPEG-4 \(mp4v\) encoder"):
        VideoWriter(tmp_path / "m.mp4", 10.0, (48, 64))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".tif"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_frames_header_size_is_its_decoded_size(tmp_path, ext, orientation):
    """`header_size` gives (H, W) as `read_image` decodes the file, EXIF orientation applied, for every format's
    way of storing it (PIL reports a turned TIFF's size already turned: it was turned twice, and a folder with
    such a frame was refused though its frames decode alike)."""
    from trident_core.image import header_size, read_image

    im = Image.fromarray(np.random.RandomState(orientation).randint(0, 255, (40, 64, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / f"f{ext}", exif=exif.tobytes())
    assert header_size(tmp_path / f"f{ext}") == read_image(tmp_path / f"f{ext}").shape[:2]


def test_a_png_frames_header_is_read_without_decoding_it(tmp_path, monkeypatch):
    """Checking a folder clip's frames reads their headers only: a PNG's EXIF lookup decoded the whole image."""
    from PIL import PngImagePlugin

    from trident_core.image import header_size

    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "f.png")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda _self: pytest.fail("the PNG was decoded"))
    assert header_size(tmp_path / "f.png") == (48, 64)


def test_frames_too_large_or_empty_are_one_line_before_the_models(frames, tmp_path):
    """Frames wider than MPEG-4 codes (8192: the encoder refused them after the models loaded, blamed on a missing
    encoder) and an empty frame file (an interrupted copy) are refused in one line saying so."""
    with pytest.raises(ValueError, match=r"8192x16 pixels: too large for an MPEG-4 video \(at most 8190"):
        video_io.check_video_size((16, 8192), "the clip x")
    video_io.check_video_size((16, 8190), "the clip x")
    for k, f in enumerate(frames[:3]):
        Image.fromarray(f).save(tmp_path / f"{k}.png")
    (tmp_path / "1.png").write_bytes(b"")
    with pytest.raises(VideoError, match=r"1\.png.*the file is empty \(0 bytes\)"):
        open_clip(tmp_path)
