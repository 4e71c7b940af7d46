"""`segment` never loses a user's file, and a damaged cache or output is redone, never a crash or a wrong answer:
only what a marker lists is replaced or deleted, an input is never an output, caches fail into misses, resume
re-checks what it skips, truncated images are skipped, every skipped entry is counted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trident_core.batch as batch
from trident_core.cli import main
from trident_core.instances import find_instances, find_largest_instances, write_instances
from trident_core.outputs import numbered

CLASSES = "sky, person; astronaut, flag"


def _models(ckpts) -> list[str]:
    return ["--clip", str(ckpts["clip"]), "--dino", str(ckpts["dino"]), "--sam", str(ckpts["sam"]), "--device",
            "cpu", "--no-download", "--classes", CLASSES, "--no-refine"]


def _image(path: Path, photo: np.ndarray, offset: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo[offset:offset + 48, :64]).save(path)
    return path


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("TRIDENT_CACHE", str(folder))
    return folder


# ------------------------------------------------------------------------------- the user's files stay theirs

def test_single_image_into_a_users_folder_keeps_every_file_of_theirs(small_ckpts, photo, tmp_path, cache, capsys):
    img = _image(tmp_path / "p.png", photo)
    out = tmp_path / "mine"
    mine = {"masks/cat.png": b"my cat", "instances/keep.png": b"my object", "instances.json": b"[my list]",
            "notes.txt": b"my notes"}
    for rel, data in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(out)]) == 0
    tree = _tree(out)
    assert all(tree[rel] == data for rel, data in mine.items())
    assert "labels.png" in tree and "masks/000_sky.png" in tree
    listed = json.loads(tree["trident.json"])["files"]
    assert "instances.json" not in listed and "masks/cat.png" not in listed
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(out), "--overwrite"]) == 0
    assert all(_tree(out)[rel] == data for rel, data in mine.items())  # a re-run leaves them too
    capsys.readouterr()
    # --instances would write instances.json, which is theirs: refused before anything runs, nothing changed
    before = _tree(out)
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(out), "--instances"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "instances.json is not a file Trident wrote" in err[0]
    assert _tree(out) == before


def test_our_own_files_from_an_earlier_run_are_replaced_and_stale_ones_removed(small_ckpts, photo, tmp_path, cache):
    img = _image(tmp_path / "p.png", photo)
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "cat.png").write_bytes(b"my cat")
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(out), "--instances", "--min-area",
                 "1"]) == 0
    assert (out / "instances.json").is_file()
    assert main(["segment", str(img), *_models(small_ckpts)[:-3], "--classes", "sky, grass", "--out", str(out)]) == 0
    tree = _tree(out)
    assert not (out / "instances.json").exists() and not (out / "instances").exists()
    assert {k for k in tree if k.startswith("masks/")} == {"masks/000_sky.png", "masks/001_grass.png", "masks/cat.png"}


def test_an_input_is_never_an_output(small_ckpts, photo, tmp_path, cache, capsys):
    folder = tmp_path / "shots"
    overlay = _image(folder / "overlay.png", photo)
    before = overlay.read_bytes()
    assert main(["segment", str(overlay), *_models(small_ckpts), "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(overlay) in err[0] and "input image" in err[0]
    img = _image(folder / "p.png", photo, 10)
    for target in (img, overlay):
        assert main(["segment", str(img), *_models(small_ckpts), "--save-npz", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(target) in err[0]
    assert overlay.read_bytes() == before and Image.open(img).size == (64, 48)
    other = tmp_path / "data.npz"  # an npz the user made: not replaced either
    np.savez(other, x=np.arange(3))
    assert main(["segment", str(img), *_models(small_ckpts), "--save-npz", str(other)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert np.array_equal(np.load(other)["x"], np.arange(3))


def test_a_linked_output_folder_leaves_nothing_behind(small_ckpts, photo, tmp_path, cache):
    root = tmp_path / "in"
    _image(root / "a.png", photo)
    _image(root / "b.png", photo, 8)
    out = tmp_path / "out"
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(out)]) == 0
    target = tmp_path / "elsewhere"
    shutil.move(out / "a.png", target)
    (out / "a.png").symlink_to(target, target_is_directory=True)
    for _ in range(2):
        assert main(["segment", str(root), *_models(small_ckpts), "--out", str(out), "--overwrite"]) == 0
    assert (out / "a.png").is_symlink() and (target / "trident.json").is_file()
    assert not [p for p in [*out.iterdir(), *tmp_path.iterdir()] if ".partial-" in p.name]


def test_runs_writing_into_one_folder_take_turns(tmp_path):
    """The folder lock: while one run changes a folder's outputs, another waits for it."""
    import threading
    import time

    from trident_core.atomic import folder_lock

    events: list[str] = []

    def second() -> None:
        with folder_lock(tmp_path):
            events.append("second")

    with folder_lock(tmp_path):
        worker = threading.Thread(target=second)
        worker.start()
        time.sleep(0.3)
        events.append("first done")
    worker.join(5)
    assert events == ["first done", "second"]


# ------------------------------------------------------------------------------------- caches fail into misses

def test_damaged_and_misplaced_caches_do_not_stop_the_run(small_ckpts, photo, tmp_path, cache, capsys,
                                                         monkeypatch):
    img = _image(tmp_path / "p.png", photo)
    cache.mkdir()
    (cache / "text-embeddings").write_bytes(b"a file where a folder belongs")
    (cache / "kernels").mkdir()
    from trident_core.kernels.timing import host_key

    (cache / "kernels" / f"timings-{host_key()}.json").write_text('{"k": ' * 50000 + "1" + "}" * 50000)
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "1 segmented" in err and "Traceback" not in err
    shutil.rmtree(cache)
    (cache / "text-embeddings").mkdir(parents=True)
    (cache / "text-embeddings" / "file-hashes.json").write_text('{"x": ' + "9" * 10000 + "}")
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(tmp_path / "out2")]) == 0
    shutil.rmtree(cache)
    cache.parent.joinpath("blocker").write_bytes(b"")  # a cache folder that cannot be created at all
    monkeypatch.setenv("TRIDENT_CACHE", str(cache.parent / "blocker" / "cache"))
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(tmp_path / "out3")]) == 0


def test_a_damaged_marker_in_a_folder_run_is_redone_not_fatal(small_ckpts, photo, tmp_path, cache, capsys):
    root = tmp_path / "in"
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        _image(root / name, photo, 8 * i)
    out = tmp_path / "out"
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(out)]) == 0
    good = {name: _tree(out / name) for name in ("a.png", "b.png", "c.png")}
    marker = (out / "a.png" / "trident.json").read_bytes()
    (out / "a.png" / "trident.json").write_bytes(marker[:len(marker) // 2])  # cut short
    (out / "b.png" / "trident.json").write_bytes(marker[:14] + b"[" * 100000 + b"\x00\x01 not json")  # garbled
    capsys.readouterr()
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(out)]) == 0
    assert "2 segmented in" in capsys.readouterr().err
    assert {name: _tree(out / name) for name in ("a.png", "b.png", "c.png")} == good


# ------------------------------------------------------------------------------ resume re-checks what it skips

@pytest.mark.parametrize("damage", ["deleted", "emptied", "garbled", "another_valid_png", "truncated_npz",
                                    "marker_lists_nothing"])
def test_resume_redoes_outputs_that_are_gone_or_damaged(small_ckpts, photo, tmp_path, cache, capsys, damage):
    root = tmp_path / "in"
    _image(root / "a.png", photo)
    _image(root / "b.png", photo, 8)
    out, npz = tmp_path / "out", tmp_path / "npz"
    args = ["segment", str(root), *_models(small_ckpts), "--out", str(out), "--save-npz", str(npz)]
    assert main(args) == 0
    want = _tree(out / "a.png")
    target = out / "a.png" / "masks" / "001_person.png"
    if damage == "deleted":
        target.unlink()
    elif damage == "emptied":
        target.write_bytes(b"")
    elif damage == "garbled":
        target.write_bytes(target.read_bytes()[:-20] + bytes(20))
    elif damage == "another_valid_png":  # reads back fine, but is not what the run wrote
        Image.fromarray(np.zeros((1, 1), np.uint8)).save(target)
    elif damage == "truncated_npz":
        path = npz / "a.png.npz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        marker = json.loads((out / "a.png" / "trident.json").read_text())
        (out / "a.png" / "trident.json").write_text(json.dumps({**marker, "files": []}))
    capsys.readouterr()
    if damage == "marker_lists_nothing":  # not complete, yet its files are no longer provably ours: left, reported
        before = _tree(out / "a.png")
        assert main(args) == 3
        assert "labels.png is not a file Trident wrote" in capsys.readouterr().err
        assert _tree(out / "a.png") == before
        return
    assert main(args) == 0
    assert "1 segmented in" in capsys.readouterr().err
    assert _tree(out / "a.png") == want
    with np.load(npz / "a.png.npz") as z:
        assert "labels" in z.files


def test_other_weights_of_the_same_size_and_time_are_not_taken_for_the_old_ones(small_ckpts, photo, tmp_path, cache,
                                                                                capsys):
    img = _image(tmp_path / "p.png", photo)
    dino = tmp_path / "dino.pth"
    sd = torch.load(small_ckpts["dino"], weights_only=True)
    torch.save({k: v.clone() for k, v in sd.items()}, dino)
    args = _models(small_ckpts)
    args[args.index("--dino") + 1] = str(dino)
    out = tmp_path / "out"
    assert main(["segment", str(img), *args, "--out", str(out), "--save-npz", str(tmp_path / "a.npz")]) == 0
    st = os.stat(dino)
    (tmp_path / "other").mkdir()  # (torch.save stores the file's stem inside: the same name keeps the size)
    torch.save({k: v + 0.05 if v.is_floating_point() else v.clone() for k, v in sd.items()}, tmp_path / "other" /
               dino.name)
    shutil.copyfile(tmp_path / "other" / dino.name, dino)  # as `cp -p` restores it: other bytes, same size, time
    os.utime(dino, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(dino).st_size == st.st_size
    capsys.readouterr()
    assert main(["segment", str(img), *args, "--out", str(out), "--save-npz", str(tmp_path / "a.npz")]) == 0
    assert "1 segmented" in capsys.readouterr().err


# ------------------------------------------------------------------------- what a folder run skips, it counts

def test_truncated_images_dangling_links_and_pipes_are_skipped_and_counted(small_ckpts, photo, tmp_path, cache,
                                                                           capsys, monkeypatch):
    root = tmp_path / "in"
    _image(root / "good.png", photo)
    cut = root / "cut.jpg"
    Image.fromarray(photo[:256, :256]).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])  # an interrupted copy
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")
    junk = root / "junk.png"
    with open(junk, "wb") as f:  # a large file of no image format: refused from its first bytes
        f.write(b"not an image at all")
        f.truncate(1 << 30)
    hashed: list[str] = []
    real_key = batch.image_key
    monkeypatch.setattr(batch, "image_key", lambda d, p: hashed.append(p.name) or real_key(d, p))
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    skipped = 4 if hasattr(os, "mkfifo") else 3
    assert "1 segmented in" in err and f"{skipped} skipped" in err
    assert "does not decode completely" in err and "broken symbolic link" in err and "junk.png" in err
    assert "junk.png" not in hashed
    assert not (tmp_path / "out" / "cut.jpg").exists()


# ------------------------------------------------------------------------------------ objects: bounded, sorted

def test_objects_are_capped_to_the_largest_in_their_order():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (64, 64))
    labels[5:25, 5:25] = 1  # one large object per class among many specks
    labels[40:60, 30:50] = 2
    every = find_instances(labels, [1, 2], ["a", "b", "c"], 1)
    kept, dropped = find_largest_instances(labels, [1, 2], ["a", "b", "c"], 1, max_objects=5)
    by_size = sorted(range(len(every)), key=lambda j: (-every[j].area, j))[:5]
    assert dropped == len(every) - 5
    assert [(o.class_index, o.box, o.area) for o in kept] == [
        (every[j].class_index, every[j].box, every[j].area) for j in sorted(by_size)]
    assert all(np.array_equal(k.mask, every[j].mask) for k, j in zip(kept, sorted(by_size)))


def test_object_files_sort_in_their_order_past_999(tmp_path):
    from trident_core.instances import Instance

    assert numbered(7, 1000, "x") == "007_x.png" and numbered(7, 1001, "x") == "0007_x.png"
    objects = [Instance(0, 0, "dot", (i % 40, i // 40, i % 40 + 1, i // 40 + 1), 1, 1.0, np.ones((1, 1), bool))
               for i in range(1001)]
    write_instances(objects, (30, 40), tmp_path)
    records = json.loads((tmp_path / "instances.json").read_text())
    assert [r["mask"] for r in records] == sorted(r["mask"] for r in records)
    assert sorted(p.name for p in (tmp_path / "instances").iterdir())[1000] == "1000_dot.png"


def test_max_objects_in_the_cli(small_ckpts, photo, tmp_path, cache, capsys):
    img = _image(tmp_path / "p.png", photo)
    out = tmp_path / "out"
    assert main(["segment", str(img), *_models(small_ckpts), "--out", str(out), "--instances", "--min-area", "1",
                 "--max-objects", "2"]) == 0
    assert len(json.loads((out / "instances.json").read_text())) <= 2
    with pytest.raises(SystemExit):
        main(["segment", str(img), *_models(small_ckpts), "--out", str(out), "--instances", "--max-objects", "0"])
    assert "--max-objects must be a whole number >= 1" in capsys.readouterr().err


def test_a_rerun_given_an_earlier_output_as_its_image_keeps_it(small_ckpts, photo, tmp_path, cache, capsys):
    """The image was a mask the old marker listed and this run (other classes) does not write again: it was
    deleted as a stale output."""
    out = tmp_path / "out"
    assert main(["segment", str(_image(tmp_path / "p.png", photo)), *_models(small_ckpts), "--out", str(out)]) == 0
    mask = out / "masks" / numbered(0, 3, "sky", ".png")
    before = mask.read_bytes()
    assert main(["segment", str(mask), *_models(small_ckpts)[:-3], "--classes", "cat, dog", "--no-refine", "--out",
                 str(out)]) == 0
    assert mask.read_bytes() == before
    assert (out / "masks" / numbered(0, 2, "cat", ".png")).is_file()
