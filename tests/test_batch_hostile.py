"""`segment` on many images against what careless or unlucky users do: --out on the images' folder, two runs into
one --out, an image that fails mid-pipeline, pipes and devices, huge declared sizes, write errors, unreadable
sub-folders, globs over non-images, interrupted replacements and --save-npz folders for one image."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import trident_core.batch as batch
import trident_core.image_list as image_list
from trident_core.atomic import partial_name, remove_partials
from trident_core.cli import main
from trident_core.image import ImageError, read_image
from trident_core.image_list import gather

CLASSES = "sky, person; astronaut, flag"


def _models(ckpts) -> list[str]:
    return ["--clip", str(ckpts["clip"]), "--dino", str(ckpts["dino"]), "--sam", str(ckpts["sam"]), "--device",
            "cpu", "--no-download", "--classes", CLASSES]


def _images(folder, photo, names=("a.png", "b.png")):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(photo[i * 20:i * 20 + 64, :80]).save(folder / name)
    return folder


def _err_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[")]


def test_out_on_the_images_folder_is_refused_and_the_images_stay(small_ckpts, photo, tmp_path, capsys):
    root = _images(tmp_path / "in", photo)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(root)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "choose an --out that is not the images' folder" in err[0]
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


def test_another_running_process_keeps_its_temporary_files(tmp_path):
    final = tmp_path / "x.png"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        theirs = final.with_name(f".x.png.partial-{alive.pid}")
        left = final.with_name(f".x.png.partial-{dead.pid}-old")
        mine = partial_name(final)
        for p in (theirs, left, mine):
            p.mkdir()
        remove_partials(final)
        assert theirs.is_dir() and not left.exists() and not mine.exists()
    finally:
        alive.kill()
        alive.wait()


def test_an_image_that_fails_is_skipped_by_name_and_the_rest_go_on(small_ckpts, photo, tmp_path, capsys):
    root = _images(tmp_path / "in", photo)
    Image.fromarray(np.zeros((4, 1500, 3), np.uint8)).save(root / "a_tall.png")  # too elongated for SAM
    out = tmp_path / "out"
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(out)]) == 3
    err = _err_lines(capsys)
    assert [ln for ln in err if ln.startswith("skipped")] == [
        ln for ln in err if "a_tall.png" in ln and "too elongated for SAM" in ln]
    assert "2 segmented" in err[-1] and "1 skipped" in err[-1]
    assert (out / "a.png" / "trident.json").is_file() and (out / "b.png" / "trident.json").is_file()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_in_a_list_is_skipped_not_waited_for(small_ckpts, photo, tmp_path, capsys):
    root = _images(tmp_path / "in", photo, ("a.png",))
    os.mkfifo(root / "pipe.png")
    (tmp_path / "list.txt").write_text("in/a.png\nin/pipe.png\n")
    unblock = threading.Thread(target=_close_readers, args=(root / "pipe.png", 20.0), daemon=True)
    unblock.start()  # should the pipe be opened after all, the test fails instead of waiting forever
    assert main(["segment", f"@{tmp_path / 'list.txt'}", *_models(small_ckpts), "--out", str(tmp_path / "o")]) == 3
    err = _err_lines(capsys)
    assert any("pipe.png is not a regular file" in ln for ln in err)
    with pytest.raises(image_list.InputError, match="not a regular file"):
        gather([str(root / "pipe.png")])


def _close_readers(fifo, seconds: float) -> None:
    """For `seconds`, give end-of-file to whoever opens `fifo` for reading."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # nobody reading (ENXIO)
            time.sleep(0.05)


def test_a_huge_declared_size_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 megapixels in a small file, under PIL's own bomb limit
    monkeypatch.setattr("cv2.imread", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImageError, match="declares 9000x8000 pixels"):
        read_image(path)


def test_write_errors(small_ckpts, photo, tmp_path, monkeypatch, capsys):
    """A full disk stops the run with one line; a folder that refuses one image's files skips that image."""
    import trident_core.outputs as outputs

    root = _images(tmp_path / "in", photo)
    real = outputs.write_images

    def refuse_a(seg, image, folder):
        if folder.name.startswith(".a.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        real(seg, image, folder)

    monkeypatch.setattr(outputs, "write_images", refuse_a)
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(tmp_path / "o1")]) == 3
    err = _err_lines(capsys)
    assert any(ln.startswith("skipped") and "a.png" in ln and "Permission denied" in ln for ln in err)
    assert (tmp_path / "o1" / "b.png" / "trident.json").is_file()

    def full(seg, image, folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_images", full)
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(tmp_path / "o2")]) == 2
    err = _err_lines(capsys)
    assert err[-1].startswith("error:") and "No space left on device while writing the outputs of a.png" in err[-1]
    assert "run the same command again" in err[-1]
    assert not any("Traceback" in ln for ln in err)


def test_an_unreadable_sub_folder_is_reported_and_counted(photo, tmp_path, monkeypatch):
    root = _images(tmp_path / "in", photo, ("a.png",))
    (root / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(top):  # as the system answers for a folder this user may not list (the tests may run as root)
        if os.path.samefile(top, root / "locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(top))
        return real_scandir(top)

    monkeypatch.setattr(image_list.os, "scandir", scandir)
    jobs, _ = gather([str(root)])
    assert [(j.name, j.error is not None) for j in jobs] == [("a.png", False), ("locked", True)]
    assert "cannot list the folder" in jobs[1].error and "Permission denied" in jobs[1].error
    logged = []
    counts = batch.run(lambda images: (pytest.fail("segmented") for _ in images), jobs[1:],
                       batch.Destinations(None, None, False), {}, log=logged.append, show_progress=False)
    assert counts.unreadable == 1 and "locked" in logged[0]


def test_globs_take_images_only(photo, tmp_path):
    root = _images(tmp_path / "in", photo, ("a.png",))
    (root / "notes.txt").write_text("x")
    (root / "trident.json").write_text("{}")
    jobs, _ = gather([str(root / "*")])
    assert [j.name for j in jobs] == ["a.png"]


def test_a_complete_image_loses_the_leftovers_of_a_killed_replacement(small_ckpts, photo, tmp_path, capsys):
    root = _images(tmp_path / "in", photo, ("a.png",))
    out = tmp_path / "out"
    assert main(["segment", str(root), str(root / "a.png"), *_models(small_ckpts), "--out", str(out)]) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = out / f".a.png.partial-{dead.pid}-old"
    leftover.mkdir()
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(out)]) == 0
    assert "1 already complete" in capsys.readouterr().err
    assert not leftover.exists()


def test_single_image_outputs_stay_ours_while_replaced(small_ckpts, photo, tmp_path, monkeypatch):
    """Between the old marker and the new one, the out folder keeps a marker that matches no run: a folder run
    over it takes its files neither as complete nor as input images."""
    import trident_core.outputs as outputs

    img = _images(tmp_path / "in", photo, ("a.png",)) / "a.png"
    out = tmp_path / "in" / "result"
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(out)]) == 0

    real = outputs._move_in

    def killed(tmp, final, name):
        real(tmp, final, name)
        raise KeyboardInterrupt  # after the first file was replaced

    monkeypatch.setattr(outputs, "_move_in", killed)
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(out), "--overwrite"]) == 130
    assert (out / "trident.json").is_file() and (out / "labels.png").is_file()
    jobs, _ = gather([str(tmp_path / "in")])
    assert [j.name for j in jobs] == ["a.png"]


def test_save_npz_folder_for_one_image(small_ckpts, photo, tmp_path, capsys):
    img = _images(tmp_path / "in", photo, ("a.png",)) / "a.png"
    assert main(["segment", str(img), *_models(small_ckpts), "--save-npz", f"{tmp_path / 'new'}/"]) == 0
    assert (tmp_path / "new" / "a.png.npz").is_file()
    assert main(["segment", str(img), *_models(small_ckpts), "--save-npz", str(tmp_path / "new")]) == 0
    with pytest.raises(SystemExit):
        main(["segment", str(img), *_models(small_ckpts), "--out", str(tmp_path / "o"), "--save-npz", ""])
    assert "--save-npz needs a path" in capsys.readouterr().err


def test_instances_before_the_images_says_so(small_ckpts, photo, tmp_path, capsys, monkeypatch):
    root = _images(tmp_path / "in", photo)
    rc = main(["segment", "--instances", str(root / "a.png"), str(root / "b.png"), *_models(small_ckpts), "--out",
               str(tmp_path / "o")])
    err = _err_lines(capsys)
    assert rc == 2 and len(err) == 1 and "put --instances after the images" in err[0]
    (tmp_path / "person").mkdir()  # a folder named like a class does not stop that class
    monkeypatch.chdir(tmp_path)
    assert main(["segment", str(root / "a.png"), "--instances", "person", *_models(small_ckpts), "--out",
                 str(tmp_path / "o")]) == 0


def test_replacing_a_folder_another_run_just_replaced(tmp_path, monkeypatch):
    """The other run moved its folder in between: this run's move fails once, is tried again, and wins."""
    import trident_core.atomic as atomic

    final, tmp = tmp_path / "x.png", tmp_path / ".x.png.partial-new"
    for folder, text in ((final, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    real, failed = os.replace, []

    def overtaken(src, dst):
        if not failed and str(src) == str(tmp):
            failed.append(1)
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", overtaken)
    atomic.replace_folder(tmp, final)
    assert failed and (final / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
