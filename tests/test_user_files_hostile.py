"""The command line against a hostile user's review of 2026-12-03 (H<n> its findings): files of the user's that
only looked like ours (a zip cut short at --save-npz, a trident.json that is not JSON, an existing file at eval's
--out or its resume state) are refused and left as they were, where a damaged file of ours is still replaced; eval
refuses to evaluate no images."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trident_core.cli import main

CLASSES = "sky, tree"


def _models(ckpts) -> list[str]:
    return ["--clip", str(ckpts["clip"]), "--dino", str(ckpts["dino"]), "--sam", str(ckpts["sam"]), "--device",
            "cpu", "--no-download", "--no-refine", "--short-side", "64"]


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TRIDENT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]


def _cut_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "x" * 9000)
    path.write_bytes(path.read_bytes()[:-30])  # its central directory cut short: the zip no longer opens
    return path


def _half_checkpoint(path: Path) -> Path:
    torch.save({"w": torch.zeros(4096)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut short
    return path


# H1 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_cut_zip, _half_checkpoint, lambda p: p.write_bytes(b"") and p],
                         ids=["zip cut short", "checkpoint cut short", "empty file"])
def test_h1_save_npz_onto_a_users_damaged_zip_is_refused(small_ckpts, tmp_path, capsys, make):
    """H1: any file starting like a zip that no longer opens (or an empty one) was taken for what is left of an npz
    of ours and replaced: a half-downloaded .pth named at --save-npz was lost."""
    target = tmp_path / "mine.pth"
    make(target)
    before = target.read_bytes()
    rc = main(["segment", str(_image(tmp_path / "a.png")), *_models(small_ckpts), "--classes", CLASSES,
               "--save-npz", str(target)])
    assert rc == 2 and "a file Trident did not write is there" in _errors(capsys)[0]
    assert target.read_bytes() == before


def test_h1_an_npz_of_ours_cut_short_is_still_replaced(small_ckpts, tmp_path, capsys):
    """Its first member is the run key (written first), which a file cut short keeps: the proof it is ours."""
    img, npz = _image(tmp_path / "a.png"), tmp_path / "r.npz"
    args = ["segment", str(img), *_models(small_ckpts), "--classes", CLASSES, "--save-npz", str(npz)]
    assert main(args) == 0
    with zipfile.ZipFile(npz) as z:
        assert z.namelist()[0] == "run_key.npy"
    whole = npz.read_bytes()
    npz.write_bytes(whole[:len(whole) // 3])
    assert main(args) == 0
    with np.load(npz) as z:
        assert {"labels", "probs", "run_key"} <= set(z.files)


# H2 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [False, True], ids=["image", "clip"])
def test_h2_a_users_trident_json_that_is_not_json_is_left_alone(small_ckpts, tmp_path, capsys, clip):
    """H2: a trident.json that does not parse (a hand-written config with a comment) was taken for a damaged marker
    of ours and replaced."""
    out = tmp_path / "proj"
    out.mkdir()
    mine = b'// my config\n{"a": [1, 2,],}\n'
    (out / "trident.json").write_bytes(mine)
    if clip:
        frames = tmp_path / "frames"
        for k in range(2):
            _image(frames / f"{k:03d}.png")
        args = ["segment", str(frames), "--video"]
    else:
        args = ["segment", str(_image(tmp_path / "a.png"))]
    rc = main([*args, *_models(small_ckpts), "--classes", CLASSES, "--out", str(out)])
    assert rc == 2 and "is not a marker Trident wrote" in _errors(capsys)[0]
    assert (out / "trident.json").read_bytes() == mine and sorted(p.name for p in out.iterdir()) == ["trident.json"]


def test_h2_markers_begin_as_the_damage_check_expects(small_ckpts, tmp_path):
    from trident_core.marker import MARKER_START

    out = tmp_path / "out"
    assert main(["segment", str(_image(tmp_path / "a.png")), *_models(small_ckpts), "--classes", CLASSES,
                 "--out", str(out)]) == 0
    assert (out / "trident.json").read_bytes().startswith(MARKER_START)


# H3, H8 --------------------------------------------------------------------------------------------------------
def _tiny_cityscapes(root: Path) -> Path:
    stem = "aachen/aachen_000000_000019"
    img = root / "cityscapes/leftImg8bit/val" / f"{stem}_leftImg8bit.png"
    lab = root / "cityscapes/gtFine/val" / f"{stem}_gtFine_labelTrainIds.png"
    _image(img)
    lab.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 19, (48, 64)).astype(np.uint8)).save(lab)
    return root


def _eval(ckpts, root: Path, out: Path, *more: str) -> list[str]:
    return ["eval", "--preset", "city_scapes", "--data-root", str(root), "--out", str(out), *_models(ckpts)[:9],
            *more]


def test_h3_eval_out_onto_a_users_file_is_refused_before_the_models_load(small_ckpts, tmp_path, capsys,
                                                                          monkeypatch):
    """H3: eval --out replaced any file there, and wrote its resume state over a file of that name beside it."""
    import trident_core.cli as cli

    monkeypatch.setattr(cli, "build_trident", lambda *a: pytest.fail("models loaded"))
    root = _tiny_cityscapes(tmp_path / "data")
    mine = tmp_path / "myresult.json"
    mine.write_text('{"my": "own results"}')
    assert main(_eval(small_ckpts, root, mine)) == 2
    assert "is not a result Trident's eval wrote" in _errors(capsys)[0]
    assert mine.read_text() == '{"my": "own results"}'
    state = tmp_path / "r.json.state-rank0of1.npz"
    state.write_bytes(b"MY DATA")
    assert main(_eval(small_ckpts, root, tmp_path / "r.json")) == 2
    assert "is not a state Trident wrote" in _errors(capsys)[0]
    assert state.read_bytes() == b"MY DATA" and not (tmp_path / "r.json").exists()


def test_h3_eval_replaces_its_own_result(small_ckpts, tmp_path, capsys):
    import json

    root, out = _tiny_cityscapes(tmp_path / "data"), tmp_path / "r.json"
    assert main(_eval(small_ckpts, root, out)) == 0
    first = json.loads(out.read_text())
    assert main(_eval(small_ckpts, root, out, "--no-resume")) == 0  # a rerun over its own result
    assert json.loads(out.read_text())["mIoU"] == first["mIoU"]


def test_eval_resumes_by_the_models_contents_and_refuses_another_class_list(small_ckpts, tmp_path, capsys,
                                                                             monkeypatch):
    """A resume compared the model paths as typed (the same file by another spelling was "a different run") but not
    the class names prompted (a changed class file was resumed into one result); the result names both."""
    import json
    import shutil

    import trident_core.evaluation as ev
    from trident_core.classes import ClassList
    from trident_core.presets import Preset

    root, out = _tiny_cityscapes(tmp_path / "data"), tmp_path / "r.json"
    _image(root / "cityscapes/leftImg8bit/val/bonn/bonn_000000_000019_leftImg8bit.png")
    (root / "cityscapes/gtFine/val/bonn").mkdir()
    shutil.copy(root / "cityscapes/gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
                root / "cityscapes/gtFine/val/bonn/bonn_000000_000019_gtFine_labelTrainIds.png")
    real_evaluate = ev.evaluate

    def one_then_stop(predict, *a, **k):  # interrupted after its first image, its state kept
        calls = []

        def counted(image):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return predict(image)
        return real_evaluate(counted, *a, **k, save_every=1)

    monkeypatch.setattr(ev, "evaluate", one_then_stop)
    assert main(_eval(small_ckpts, root, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted: the images done are kept in the resume state beside --out" in err and "a clip" not in err
    monkeypatch.setattr(ev, "evaluate", real_evaluate)
    monkeypatch.chdir(small_ckpts["clip"].parent)
    spelled = _eval(small_ckpts, root, out)
    spelled[spelled.index("--clip") + 1] = f"./{small_ckpts['clip'].name}"
    assert main(spelled) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["timings"]["images_this_run"] == 1  # the other image came from the state
    assert result["config"]["classes"][0][0] == "road" and result["models"]["clip"] == str(small_ckpts["clip"])
    assert "clip" not in result["config"]  # (paths are not compared; their contents are, by sha256)
    assert main(_eval(small_ckpts, root, out)) == 0  # again: its own complete result, replaced
    monkeypatch.setattr(ev, "evaluate", one_then_stop)
    assert main(_eval(small_ckpts, root, out, "--no-resume")) == 130
    monkeypatch.setattr(ev, "evaluate", real_evaluate)
    monkeypatch.setattr(Preset, "classes", lambda self: ClassList(tuple((f"class {i}",) for i in range(19))))
    assert main(_eval(small_ckpts, root, out)) == 2
    assert "is from a different run (config: classes differ)" in _errors(capsys)[0]


def test_eval_on_part_of_a_split_warns_in_one_line(small_ckpts, tmp_path, capsys):
    """The command (run() wraps main() so) shows a warning as one line; main() called from Python leaves the
    caller's warning handling alone (recorded warnings stay recorded)."""
    import warnings

    from trident_core.cli import one_line_warnings

    root, out = _tiny_cityscapes(tmp_path / "data"), tmp_path / "r.json"
    with one_line_warnings():
        assert main(_eval(small_ckpts, root, out)) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "official split" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: city_scapes: 1 images under")
    assert "UserWarning" not in warned[0] and ".py:" not in warned[0]
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        assert main(_eval(small_ckpts, root, out, "--no-resume")) == 0
    assert any("official split" in str(w.message) for w in recorded)
    assert "official split" not in capsys.readouterr().err


@pytest.mark.parametrize(("limit", "said"), [("0", "evaluate at least 1 image"), ("-1", "evaluate at least 1 image"),
                                             ("two", "'two' is not a whole number")])
def test_h8_eval_of_no_images_is_refused_at_once(small_ckpts, tmp_path, capsys, monkeypatch, limit, said):
    """H8: --limit 0 printed NaN metrics and exited 0; --limit -1 was refused only after the models loaded."""
    import trident_core.cli as cli

    monkeypatch.setattr(cli, "build_trident", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(SystemExit) as e:
        main(_eval(small_ckpts, tmp_path, tmp_path / "r.json", "--limit", limit))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--limit" in err[0] and said in err[0]


# H7 ------------------------------------------------------------------------------------------------------------
def test_h7_a_folder_run_takes_the_users_images_beside_outputs_and_leaves_out_only_what_a_marker_lists(
        small_ckpts, tmp_path, capsys):
    """H7: any labels.png, overlay.png or masks/*.png beside any trident.json was taken for an output and left
    out (the user's own images lost from the run, exit 0), while a clip's PNG frames (masks/NNN_cls/000000.png)
    were segmented as images."""
    from trident_core.image_list import gather

    pics = tmp_path / "pics"
    mine = [_image(pics / name) for name in ("cat.png", "labels.png", "masks/dog.png")]
    frames = tmp_path / "frames"
    for k in range(2):
        _image(frames / f"{k:03d}.png")
    assert main(["segment", str(frames), "--video", *_models(small_ckpts), "--classes", CLASSES, "--out", str(pics),
                 "--png-frames"]) == 0
    written = [p for p in pics.rglob("*.png") if p not in mine]
    assert any(p.parent.parent.name == "masks" for p in written)  # the clip's PNG frames are there
    jobs, _single = gather([str(pics)])
    assert sorted(j.path for j in jobs) == sorted(mine)
    jobs, _single = gather([str(pics / "**" / "*.png")])
    assert sorted(j.path for j in jobs) == sorted(mine)


# H6 ------------------------------------------------------------------------------------------------------------
def test_h6_a_clip_or_out_path_opencv_cannot_take_is_one_line_not_a_crash(small_ckpts, tmp_path):
    """H6: OpenCV's video reader and writer crash the process (SIGSEGV, no message) on a path whose bytes are not
    UTF-8; images already went through PIL there. Run in a child process: a crash must not take the tests."""
    import os
    import subprocess
    import sys

    from trident_core.video_io import VideoWriter

    good = tmp_path / "clip.mp4"
    with VideoWriter(good, 12.0, (48, 64)) as w:
        for k in range(3):
            w.write(np.full((48, 64, 3), 40 * k, np.uint8))
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/vid\xfe.mp4"))
    odd.write_bytes(good.read_bytes())
    cases = {"clip": [odd, "--out", tmp_path / "o1"],
             "out": [good, "--out", Path(os.fsdecode(os.fsencode(tmp_path) + b"/out\xff"))]}
    for what, (clip, *out) in cases.items():
        proc = subprocess.run([sys.executable, "-m", "trident_core", "segment", clip, *map(str, out),
                               *_models(small_ckpts), "--classes", CLASSES],
                              capture_output=True, env={**os.environ, "TRIDENT_CACHE": str(tmp_path / "cache")})
        err = proc.stderr.decode("utf-8", "backslashreplace").strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and "not UTF-8" in err[0], (what, proc.returncode, err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == []  # no --out made


# H9 ------------------------------------------------------------------------------------------------------------
def test_h9_a_slideshow_clip_is_written_and_a_rate_near_zero_refused_at_once(small_ckpts, tmp_path, capsys):
    """H9: --fps 0.001 (or a slideshow of 2000 s per frame, no --fps) passed the checks, then failed after the models
    loaded, blaming the encoder."""
    from trident_core.video_io import MIN_FPS, open_clip

    gif = tmp_path / "slides.gif"
    frames = [Image.fromarray(np.full((48, 64, 3), 60 * k, np.uint8)) for k in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=600_000)  # 10 minutes a frame
    assert open_clip(gif).fps == MIN_FPS
    out = tmp_path / "out"
    assert main(["segment", str(gif), "--out", str(out), *_models(small_ckpts), "--classes", CLASSES]) == 0
    assert open_clip(out / "overlay.mp4").frames == 3
    capsys.readouterr()
    for fps in ("0.001", "1e-300", "5000"):
        assert main(["segment", str(gif), "--out", str(tmp_path / "o"), "--fps", fps, *_models(small_ckpts),
                     "--classes", CLASSES]) == 2
        err = capsys.readouterr().err
        assert "--fps must be a frame rate from 0.1 to 1000" in err and "models loaded" not in err


# smaller findings ----------------------------------------------------------------------------------------------
def _frames(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    for k, (h, w) in enumerate(sizes):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 50 + 40 * k, np.uint8)).save(folder / f"{k:03d}.png")
    return folder


def test_a_failed_clip_run_leaves_no_out_folder_it_made(small_ckpts, tmp_path, capsys):
    frames = _frames(tmp_path / "frames", [(48, 64), (48, 64), (40, 64)])  # the last frame of another size
    out = tmp_path / "new" / "out"
    assert main(["segment", str(frames), "--video", "--out", str(out), *_models(small_ckpts), "--classes",
                 CLASSES]) == 2
    assert "002.png is 64x40 pixels" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the folder made on the way


def test_a_full_disk_in_a_clip_run_says_what_to_do(small_ckpts, tmp_path, capsys, monkeypatch):
    import errno

    import trident_core.video_run as video_run

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video_run, "place_outputs", full)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["segment", str(_frames(tmp_path / "frames", [(48, 64)] * 2)), "--video", "--out", str(out),
                 *_models(small_ckpts), "--classes", CLASSES]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "No space left on device while writing the clip's outputs: make room" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # a folder of the user's stays, as it was


@pytest.mark.parametrize(("extra", "said"), [(["--smooth", "0.5"], "--smooth is for clips"),
                                             (["--png-frames"], "--png-frames is for clips"),
                                             (["--fps", "3"], "--fps is for clips"),
                                             (["--max-gap", "3"], "--max-gap is for clips")])
def test_options_only_a_clip_takes_are_refused_for_images(small_ckpts, tmp_path, capsys, extra, said):
    assert main(["segment", str(_image(tmp_path / "a.png")), "--out", str(tmp_path / "o"), *_models(small_ckpts),
                 "--classes", CLASSES, *extra]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and said in err[0] and not (tmp_path / "o").exists()


def test_a_clip_among_images_is_named(small_ckpts, tmp_path, capsys):
    from trident_core.video_io import VideoWriter

    clip = tmp_path / "c.mp4"
    with VideoWriter(clip, 12.0, (48, 64)) as w:
        for k in range(2):
            w.write(np.full((48, 64, 3), 40 * k, np.uint8))
    assert main(["segment", str(_image(tmp_path / "a.png")), str(clip), "--out", str(tmp_path / "o"),
                 *_models(small_ckpts), "--classes", CLASSES]) == 2
    assert "c.mp4 is a clip: segment each clip with its own command" in _errors(capsys)[0]


@pytest.mark.parametrize(("device", "ok"), [("CPU", True), (" Cpu ", True), ("gpu", False), ("xla", False)])
def test_device_names_ignore_case_and_a_wrong_one_is_one_line(small_ckpts, tmp_path, capsys, device, ok):
    args = _models(small_ckpts)
    args[args.index("--device") + 1] = device
    rc = main(["segment", str(_image(tmp_path / "a.png")), "--out", str(tmp_path / "o"), *args, "--classes",
               CLASSES])
    err = _errors(capsys)
    if ok:
        assert rc == 0 and not err
    else:
        assert rc == 2 and len(err) == 1 and "cpu, cuda" in err[0] and "Expected one of" not in err[0]


def test_pamr_dilations_beyond_reason_are_refused_before_the_models_load(small_ckpts, tmp_path, capsys,
                                                                          monkeypatch):
    import trident_core.cli as cli

    monkeypatch.setattr(cli, "build_trident", lambda *a: pytest.fail("models loaded"))
    for dilations in ("100000", ",".join(["2"] * 9)):
        assert main(["segment", str(_image(tmp_path / "a.png")), "--out", str(tmp_path / "o"), *_models(small_ckpts),
                     "--classes", CLASSES, "--pamr-steps", "10", "--pamr-dilations", dilations]) == 2
        assert "dilations must be 1 to 8 whole numbers from 1 to 256" in _errors(capsys)[0]


def test_a_rerun_keeps_the_empty_folders_a_user_made_among_the_outputs(small_ckpts, tmp_path, capsys):
    """An output folder was replaced whole when every file in it was listed, though the user had made empty
    folders in it (not files: no listing saw them)."""
    root, out = tmp_path / "in", tmp_path / "res"
    _image(root / "a.png")
    args = ["segment", str(root), "--out", str(out), *_models(small_ckpts), "--classes", CLASSES]
    assert main(args) == 0
    (out / "a.png" / "my_empty_dir").mkdir()
    (out / "a.png" / "masks" / "my_sub").mkdir()
    assert main([*args, "--overwrite"]) == 0
    assert (out / "a.png" / "my_empty_dir").is_dir() and (out / "a.png" / "masks" / "my_sub").is_dir()
    assert "1 segmented" in capsys.readouterr().err and (out / "a.png" / "labels.png").is_file()


# H5 ------------------------------------------------------------------------------------------------------------
def test_h5_a_recursive_glob_over_links_back_up_ends(tmp_path, monkeypatch):
    """H5: glob.glob's ** follows links to folders without end: two links back up made `s/**/*.png` exponential
    (a hang, memory growing, no output). Each real folder is entered once now, as for a folder given."""
    import threading

    from trident_core.image_list import gather

    s = tmp_path / "s"
    _image(s / "sub" / "a.png")
    (s / "sub" / "up").symlink_to("..")
    (s / "self").symlink_to("../s")
    monkeypatch.chdir(tmp_path)
    got = []
    t = threading.Thread(target=lambda: got.append(gather(["s/**/*.png"])), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the glob did not end"
    jobs, _single = got[0]
    assert [j.path.resolve() for j in jobs] == [(s / "sub" / "a.png").resolve()]


@pytest.mark.parametrize("pattern", ["**/*.png", "a/**/*.png", "a/**", "**/.h/*.png", "a/**/c/*.jpg", "**",
                                     "a/*/*.png", "*.png"])
def test_h5_recursive_globs_match_what_glob_matches_without_links(tmp_path, monkeypatch, pattern):
    import glob
    import os

    from trident_core.image_list import _glob

    for rel in ("a/x.png", "a/b/y.png", "a/.h/z.png", ".top/w.png", "a/b/c/v.jpg", "q.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for pat in (pattern, str(tmp_path / pattern)):
        mine = sorted(os.path.normpath(p) for p in _glob(pat) if os.path.isfile(p))
        theirs = sorted(os.path.normpath(p) for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        assert mine == theirs and mine, pat


def test_h7_outputs_under_a_damaged_marker_inside_the_input_folder_are_still_left_out(small_ckpts, tmp_path, capsys):
    """--out inside the images' folder, a marker there cut short: its signed PNGs are still outputs, not inputs
    (taken as inputs, they stopped the whole rerun as images lying where it writes), and the image is redone."""
    root = tmp_path / "d"
    _image(root / "a.png")
    args = ["segment", str(root), "--out", str(root / "out"), *_models(small_ckpts), "--classes", CLASSES]
    assert main(args) == 0
    marker = root / "out" / "a.png" / "trident.json"
    marker.write_bytes(marker.read_bytes()[:40])
    capsys.readouterr()
    assert main(args) == 0
    assert "1 segmented" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["a link reaches the folder first", "a hidden link reaches it first"])
def test_h5_a_folder_reached_through_a_link_first_is_still_searched_by_its_own_path(tmp_path, monkeypatch, layout):
    """Each real folder entered once (in listing order) lost the matches of its own path when a link (one that
    the pattern does not match, or a hidden one) reached it first."""
    from trident_core.image_list import gather

    s = tmp_path / "s"
    if layout == "a link reaches the folder first":
        img, pattern = _image(s / "cats" / "c.png"), "s/**/cats/*.png"
        (s / "aaa").mkdir()
        (s / "aaa" / "link").symlink_to("../cats")
    else:
        img, pattern = _image(s / "photos" / "p.png"), "s/**/*.png"
        (s / ".alias").symlink_to("photos")
    monkeypatch.chdir(tmp_path)
    for arg in (pattern, "s"):
        jobs, _single = gather([arg])
        assert [j.path.resolve() for j in jobs] == [img.resolve()], arg
    assert gather([pattern])[0][0].name == img.relative_to(s).as_posix()  # by its own path, as the pattern says


@pytest.mark.parametrize("shape", [(10**12,), (4,)])
def test_h1_a_run_key_member_with_a_crafted_shape_allocates_nothing(tmp_path, shape):
    """A file whose run_key.npy declares a huge (or any non-scalar) shape: not ours, and checking it makes no
    array of that shape (numpy's reader would try to allocate 36 TiB first)."""
    import io

    from trident_core.outputs import OutputConflict, check_npz_replaceable

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<U10", "fortran_order": False, "shape": shape})
    target = tmp_path / "x.npz"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as z:
        z.writestr("run_key.npy", header.getvalue() + b"x" * 160)
    for cut in (None, -30):  # whole, and cut short (its first member read from its local header)
        if cut:
            target.write_bytes(target.read_bytes()[:cut])
        with pytest.raises(OutputConflict, match="a file Trident did not write"):
            check_npz_replaceable(target)


def test_a_broken_video_is_our_one_line_without_ffmpegs(small_ckpts, tmp_path):
    """FFmpeg printed its own line ("moov atom not found") before ours."""
    import os
    import subprocess
    import sys

    from trident_core.video_io import VideoWriter

    good = tmp_path / "clip.mp4"
    with VideoWriter(good, 12.0, (48, 64)) as w:
        for k in range(3):
            w.write(np.full((48, 64, 3), 40 * k, np.uint8))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(good.read_bytes()[:64])  # its header only: no moov atom
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}
    proc = subprocess.run([sys.executable, "-m", "trident_core", "segment", str(broken), "--out", str(tmp_path / "o"),
                           *_models(small_ckpts), "--classes", CLASSES], capture_output=True, text=True,
                          env={**env, "TRIDENT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {broken}: cannot open it as a video (not a video, or a container/codec this OpenCV cannot read; "
        "convert it to H.264 .mp4 or to a folder of PNG frames)"], proc.stderr


def test_instances_before_the_only_image_says_so(tmp_path, capsys):
    """`segment --classes sky --out o --instances a.png`: --instances (its classes optional) takes the image, and
    argparse said only that IMAGE is required."""
    img = _image(tmp_path / "a.png")
    with pytest.raises(SystemExit) as e:
        main(["segment", "--classes", CLASSES, "--out", str(tmp_path / "o"), "--instances", str(img)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "required: IMAGE" in err[0] and f"--instances took '{img}'" in err[0] and "after the images" in err[0]


def test_a_float_tiff_reads_as_its_values_and_one_with_nan_is_refused(tmp_path):
    """OpenCV cast a float TIFF's samples to 8 bits unscaled: a 0..1 image came out black (segmented, exit 0), NaN
    and infinity as 0 or 255."""
    from trident_core.image import ImageError, read_image

    values = np.random.default_rng(0).random((32, 48)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "unit.tiff")
    want = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    got = read_image(tmp_path / "unit.tiff")
    assert got.shape == (32, 48, 3) and all(np.array_equal(got[..., c], want) for c in range(3))
    Image.fromarray(values * 255).save(tmp_path / "bytes.tiff")  # 0..255 floats: as they are
    assert np.array_equal(read_image(tmp_path / "bytes.tiff")[..., 0], want)
    values[5, 5] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tiff")
    with pytest.raises(ImageError, match="not numbers"):
        read_image(tmp_path / "nan.tiff")


def test_the_kernel_timings_cache_warning_is_a_warning_line_too(monkeypatch, capsys):
    """The timings were judged and written after the command's warning handling ended: a cache folder that could
    not be written printed a bare logging line after the run's summary."""
    import os

    import trident_core.cli as cli
    from trident_core import caches
    from trident_core.kernels import timing

    caches.forget()
    monkeypatch.setattr(cli, "main", lambda: 0)
    monkeypatch.setattr(timing, "flush", lambda: caches.miss("kernel timings", "/read-only", "Permission denied"))
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail(f"exit {code}") if code else None)
    cli.run()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: the kernel timings cache (/read-only) cannot be used, the run goes on without it: "
                     "Permission denied"]
