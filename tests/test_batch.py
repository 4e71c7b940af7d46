"""`segment` on many images: input forms, per-image outputs equal to single-image runs, resume, interruption,
unreadable files, and torchrun's processes writing the same files as one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trident_core.cli import main
from trident_core.image_list import InputError, gather

REPO = Path(__file__).resolve().parents[1]
CLASSES = "sky, person; astronaut, flag"


def _models(ckpts) -> list[str]:
    return ["--clip", str(ckpts["clip"]), "--dino", str(ckpts["dino"]), "--sam", str(ckpts["sam"]), "--device",
            "cpu", "--no-download", "--classes", CLASSES]


def _folder(tmp_path: Path, photo: np.ndarray) -> Path:
    """Images of mixed sizes, two with the same file name in different folders, a broken file and a text file."""
    root = tmp_path / "in"
    for rel, crop in (("a/x.png", photo[:96, :128]), ("b/x.png", photo[100:260, 50:170]),
                      ("y.jpg", photo[200:300, 200:400])):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(root / rel)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    (root / "notes.txt").write_text("not an image")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_same_npz(a: Path, b: Path) -> None:
    za, zb = _npz(a), _npz(b)
    assert set(za) == set(zb)
    for k in za:
        assert np.array_equal(za[k], zb[k]), k


# ------------------------------------------------------------------------------------------------ input forms

def test_inputs_folders_globs_and_lists_are_named_without_collisions(tmp_path, photo):
    root = _folder(tmp_path, photo)
    jobs, single = gather([str(root)])
    assert not single
    assert [j.name for j in jobs] == ["a/x.png", "b/broken.png", "b/x.png", "y.jpg"]  # sorted, .txt ignored
    assert all(j.path.is_absolute() for j in jobs)
    jobs, _ = gather([str(root / "a"), str(root / "b")])  # two folders: names relative to their common parent
    assert [j.name for j in jobs] == ["a/x.png", "b/broken.png", "b/x.png"]
    jobs, _ = gather([str(root / "*" / "x.png")])
    assert [j.name for j in jobs] == ["a/x.png", "b/x.png"]
    jobs, _ = gather([str(root / "**" / "*.jpg")])
    assert [j.name for j in jobs] == ["y.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nin/b/x.png\n\nin/a/x.png\nin/missing.png\nin/a/x.png\n")
    jobs, single = gather([f"@{listing}"])
    assert [j.name for j in jobs] == ["b/x.png", "a/x.png", "missing.png"] and not single  # relative to the list
    jobs, single = gather([str(root / "y.jpg")])
    assert [j.name for j in jobs] == ["y.jpg"] and single


def test_inputs_that_name_nothing_are_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no images in folder .*empty"):
        gather([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="no image file matches"):
        gather([str(tmp_path / "*.png")])
    with pytest.raises(InputError, match="no such image file or folder"):
        gather([str(tmp_path / "nope.png")])
    with pytest.raises(InputError, match="image list .* not found"):
        gather([f"@{tmp_path / 'nope.txt'}"])
    assert main(["segment", str(tmp_path / "empty"), "--classes", "a, b", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no images in folder" in err[0] and "empty" in err[0]


# ------------------------------------------------------------------------------------- many images, one run

def test_folder_run_equals_single_image_runs_then_resumes(small_ckpts, photo, tmp_path, capsys):
    root = _folder(tmp_path, photo)
    out, npz = tmp_path / "out", tmp_path / "npz"
    rc = main(["segment", str(root), *_models(small_ckpts), "--out", str(out), "--save-npz", str(npz)])
    assert rc == 3  # the broken file was skipped
    err = capsys.readouterr().err
    skipped = [ln for ln in err.splitlines() if "broken.png" in ln and not ln.startswith("[segment]")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped") and "cannot read image" in skipped[0]
    assert "3 segmented" in err and "1 skipped" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("**/trident.json")) == [
        "a/x.png/trident.json", "b/x.png/trident.json", "y.jpg/trident.json"]
    assert not list(out.rglob(".*")) and not list(npz.rglob(".*"))  # no temporary leftovers

    for rel in ("a/x.png", "b/x.png", "y.jpg"):  # each image alone, in the single-image layout
        one = tmp_path / "single" / rel
        assert main(["segment", str(root / rel), *_models(small_ckpts), "--out", str(one),
                     "--save-npz", str(one / "r.npz")]) == 0
        single_files = {k: v for k, v in _files(one).items() if k != "r.npz"}
        assert single_files == _files(out / rel)  # PNGs and completion marker byte for byte
        _assert_same_npz(one / "r.npz", npz / f"{rel}.npz")
        labels = np.array(Image.open(out / rel / "labels.png"))
        assert np.array_equal(labels, np.clip(_npz(npz / f"{rel}.npz")["labels"], 0, None))
    capsys.readouterr()

    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*out.rglob("*"), *npz.rglob("*")] if p.is_file()}
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(out), "--save-npz", str(npz)]) == 3
    err = capsys.readouterr().err
    assert "0 segmented" in err and "3 already complete" in err
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*out.rglob("*"), *npz.rglob("*")] if p.is_file()}
    assert after == before  # nothing rewritten

    Image.fromarray(photo[:96, :128][::-1].copy()).save(root / "a" / "x.png")  # a changed image is redone
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(out), "--save-npz", str(npz)]) == 3
    assert "1 segmented" in capsys.readouterr().err


def test_interrupted_run_leaves_no_partial_output_and_resumes(small_ckpts, photo, tmp_path, monkeypatch, capsys):
    import trident_core.outputs as outputs

    root = _folder(tmp_path, photo)
    (root / "b" / "broken.png").unlink()
    args = ["segment", str(root), *_models(small_ckpts), "--out", str(tmp_path / "out"), "--save-npz",
            str(tmp_path / "npz")]
    real = outputs.write_images
    calls = []

    def interrupted(seg, image, folder):
        calls.append(folder)
        real(seg, image, folder)
        if len(calls) == 2:  # Ctrl-C after the second image's files, before its folder is renamed
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_images", interrupted)
    assert main(args) == 130  # one line, no traceback
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted")
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / "a/x.png/trident.json").is_file()
    assert not (out / "b/x.png").exists() and not (out / "y.jpg").exists()
    assert not list(out.rglob(".*"))
    foreign = out / "y.jpg"  # a folder without our marker: its files are not ours and stay; the image is skipped
    foreign.mkdir()
    (foreign / "labels.png").write_bytes(b"mine")
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "1 segmented" in err and "labels.png is not a file Trident wrote" in err
    assert (foreign / "labels.png").read_bytes() == b"mine" and not (foreign / "trident.json").exists()
    (foreign / "labels.png").unlink()  # moved away: the image is done, into the folder that is there
    assert main(args) == 0
    assert "1 segmented" in capsys.readouterr().err and (foreign / "trident.json").is_file()

    fresh = tmp_path / "fresh"
    assert main([*args[:-4], "--out", str(fresh / "out"), "--save-npz", str(fresh / "npz")]) == 0
    assert _files(fresh / "out") == _files(out)
    for rel in ("a/x.png", "b/x.png", "y.jpg"):
        _assert_same_npz(fresh / "npz" / f"{rel}.npz", tmp_path / "npz" / f"{rel}.npz")


def test_several_images_need_a_folder_for_npz(small_ckpts, photo, tmp_path, capsys):
    root = _folder(tmp_path, photo)
    assert main(["segment", str(root), *_models(small_ckpts), "--save-npz", str(tmp_path / "r.npz")]) == 2
    assert "give a folder" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore")
def test_torchrun_two_processes_write_the_same_files_as_one(small_ckpts, photo, tmp_path):
    root = _folder(tmp_path, photo)
    Image.fromarray(photo[300:400, :160]).save(root / "z.png")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    results = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
               "trident_core", "segment", str(root), *_models(small_ckpts), "--out", str(tmp_path / f"out{n}"),
               "--save-npz", str(tmp_path / f"npz{n}")]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        # each process exits with 3 (a file was skipped); torchrun turns that into its own failure status
        assert run.returncode != 0 and "exitcode  : 3" in run.stderr, run.stderr[-3000:]
        results[n] = run.stderr
    assert "rank 1/2" in results[2] and "4 segmented" in results[2] and "1 skipped" in results[2]
    assert _files(tmp_path / "out1") == _files(tmp_path / "out2")
    names = sorted(p.relative_to(tmp_path / "npz1") for p in (tmp_path / "npz1").rglob("*.npz"))
    assert names == sorted(p.relative_to(tmp_path / "npz2") for p in (tmp_path / "npz2").rglob("*.npz"))
    assert len(names) == 4
    for rel in names:
        _assert_same_npz(tmp_path / "npz1" / rel, tmp_path / "npz2" / rel)


# ------------------------------------------------------------------------------------------- hostile inputs

def test_hostile_image_files_are_skipped_one_line_each(tmp_path, photo):
    """A name that is not valid UTF-8 (OpenCV would crash), a header claiming 400 megapixels (PIL's decompression
    bomb): each is one ImageError, never a crash; a good file with an undecodable name is read (through PIL)."""
    from trident_core.image import ImageError, read_image

    Image.fromarray(photo[:40, :60]).save(tmp_path / "good.png")
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    os.link(os.fsencode(tmp_path / "good.png"), odd)
    assert np.array_equal(read_image(os.fsdecode(odd)), photo[:40, :60])
    bomb = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(bomb)  # zeros compress to a small file
    bomb.write_bytes(bomb.read_bytes()[:2000])  # truncated: OpenCV gives up, PIL refuses the size
    with pytest.raises(ImageError, match="bomb.png"):
        read_image(bomb)


def test_lists_with_a_byte_order_mark_and_files_reached_twice(tmp_path, photo):
    """A Notepad list (BOM) keeps its first entry; a file reached through a symbolic link or a loop under ** is
    one job; a list that is not UTF-8 is one clear error."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for rel in ("x.png", "sub/t.png"):
        Image.fromarray(photo[:32, :32]).save(d / rel)
    (d / "loop").symlink_to(".")
    lst = tmp_path / "list.txt"
    lst.write_text("d/x.png\nd/sub/t.png\n", encoding="utf-8-sig")
    jobs, _ = gather([f"@{lst}"])
    assert [j.path for j in jobs] == [d / "x.png", d / "sub" / "t.png"]
    jobs, _ = gather([str(d / "**" / "*.png")])
    assert sorted(os.path.realpath(j.path) for j in jobs) == sorted(
        os.path.realpath(p) for p in (d / "x.png", d / "sub" / "t.png"))
    lst.write_bytes(b"caf\xe9.png\n")
    with pytest.raises(InputError, match="not UTF-8"):
        gather([f"@{lst}"])


def test_linked_folders_and_lists_of_folders_and_patterns(tmp_path, photo):
    """A folder's sub-folder that is a symbolic link (a dataset linked in) is searched, a link back up is no loop;
    a list's lines may be folders and patterns as on the command line; '@' alone says what it needs."""
    elsewhere, d = tmp_path / "elsewhere", tmp_path / "d"
    elsewhere.mkdir()
    d.mkdir()
    Image.fromarray(photo[:32, :32]).save(elsewhere / "e.png")
    Image.fromarray(photo[:32, :32]).save(d / "x.png")
    (d / "linked").symlink_to(elsewhere)
    (elsewhere / "up").symlink_to(d)
    jobs, _ = gather([str(d)])
    assert [j.name for j in jobs] == ["linked/e.png", "x.png"]
    (elsewhere / "up").unlink()
    lst = tmp_path / "list.txt"
    lst.write_text("elsewhere\nd/*.png\n")
    jobs, _ = gather([f"@{lst}"])
    assert [j.path for j in jobs] == [elsewhere / "e.png", d / "x.png"]
    lst.write_text("d/*.jpg\n")  # a listed pattern matching nothing is one missing entry, reported when read
    jobs, _ = gather([f"@{lst}"])
    assert [j.path for j in jobs] == [d / "*.jpg"]
    odd = tmp_path / "set[1]"  # a list in a folder whose name has glob characters
    odd.mkdir()
    Image.fromarray(photo[:32, :32]).save(odd / "o.png")
    (odd / "list.txt").write_text("*.png\nmissing[2].png\n")
    jobs, _ = gather([f"@{odd / 'list.txt'}"])
    assert [j.path for j in jobs] == [odd / "o.png", odd / "missing[2].png"]
    with pytest.raises(InputError, match="'@' needs a file name"):
        gather(["@"])


def test_outputs_are_not_inputs_but_the_users_images_beside_them_are(small_ckpts, photo, tmp_path, capsys):
    """With --out the images' own folder, the photos beside the outputs are still images; the outputs, masks and
    instances of earlier runs are not."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, crop in (("one.png", photo[:64, :96]), ("two.png", photo[100:180, :80])):
        Image.fromarray(crop).save(photos / name)
    assert main(["segment", str(photos / "one.png"), *_models(small_ckpts), "--out", str(photos),
                 "--instances", "--min-area", "1"]) == 0
    assert (photos / "trident.json").is_file() and list((photos / "instances").glob("*.png"))
    jobs, _ = gather([str(photos)])
    assert sorted(j.name for j in jobs) == ["one.png", "two.png"]


def test_long_image_names_get_short_temporary_names(small_ckpts, photo, tmp_path, capsys):
    """An image whose name fits the file system but not with the temporary suffix is still written."""
    root = tmp_path / "in"
    root.mkdir()
    long = "L" * 245 + ".png"
    Image.fromarray(photo[:48, :64]).save(root / long)
    Image.fromarray(photo[:48, :64]).save(root / "short.png")
    assert main(["segment", str(root), *_models(small_ckpts), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / long / "trident.json").is_file()
    assert not list((tmp_path / "out").rglob(".*"))


def test_other_weights_under_the_same_name_and_size_are_segmented_again(small_ckpts, photo, tmp_path, capsys):
    import shutil

    import torch

    root = tmp_path / "in"
    root.mkdir()
    for name in ("p.png", "q.png"):
        Image.fromarray(photo[:48, :64]).save(root / name)
    name = Path(small_ckpts["dino"]).name
    sd = torch.load(small_ckpts["dino"], weights_only=True)
    (tmp_path / "first").mkdir()
    (tmp_path / "other").mkdir()
    torch.save({k: v.clone() for k, v in sd.items()}, tmp_path / "first" / name)
    torch.save({k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in sd.items()}, tmp_path / "other" / name)
    assert os.path.getsize(tmp_path / "first" / name) == os.path.getsize(tmp_path / "other" / name)
    out = tmp_path / "out"
    args = _models(small_ckpts)
    for folder, segmented in (("first", 2), ("first", 0), ("other", 2)):
        args[args.index("--dino") + 1] = str(tmp_path / folder / name)
        assert main(["segment", str(root), *args, "--out", str(out)]) == 0
        assert f"{segmented} segmented" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "other")


def test_single_image_rerun_without_instances_removes_the_old_objects(small_ckpts, photo, tmp_path, capsys):
    image, out = tmp_path / "p.png", tmp_path / "out"
    Image.fromarray(photo[:64, :96]).save(image)
    assert main(["segment", str(image), *_models(small_ckpts), "--out", str(out), "--instances", "--min-area",
                 "1"]) == 0
    assert (out / "instances.json").is_file() and (out / "instances").is_dir()
    assert main(["segment", str(image), *_models(small_ckpts), "--out", str(out)]) == 0
    assert not (out / "instances.json").exists() and not (out / "instances").exists()
    assert (out / "labels.png").is_file() and (out / "trident.json").is_file()


def test_a_users_file_named_instances_is_refused_before_the_models_load(small_ckpts, photo, tmp_path, capsys,
                                                                        monkeypatch):
    import trident_core.cli as cli

    image, out = tmp_path / "p.png", tmp_path / "out"
    Image.fromarray(photo[:64, :96]).save(image)
    out.mkdir()
    (out / "instances").write_text("my notes")
    monkeypatch.setattr(cli, "build_trident", lambda *a: pytest.fail("models loaded"))
    assert main(["segment", str(image), *_models(small_ckpts), "--out", str(out), "--instances"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{out / 'instances'} is not a folder Trident wrote" in errors[0]
    assert (out / "instances").read_text() == "my notes"


@pytest.mark.parametrize("option", [["--min-area", "500"], ["--max-objects", "3"]])
def test_object_options_without_instances_are_refused_before_the_models_load(option, small_ckpts, photo, tmp_path,
                                                                              capsys, monkeypatch):
    """They were silently ignored: a run that asked for big objects only wrote none at all."""
    import trident_core.cli as cli

    image = tmp_path / "p.png"
    Image.fromarray(photo[:64, :96]).save(image)
    monkeypatch.setattr(cli, "build_trident", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(SystemExit) as exited:  # (argparse's way, as every option it refuses)
        main(["segment", str(image), *_models(small_ckpts), "--out", str(tmp_path / "o"), *option])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"error: {option[0]} is for --instances (the objects' masks): add --instances" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_rerun_with_the_same_names_as_a_background_redoes_the_images(small_ckpts, photo, tmp_path, capsys):
    """"wall, sky" and --background wall with "sky" name the same classes, but only the second labels weak pixels
    as the background: a rerun that changes one into the other took the old outputs as complete."""
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    Image.fromarray(photo[:64, :96]).save(root / "p.png")
    models = _models(small_ckpts)[:-2]
    assert main(["segment", str(root), *models, "--out", str(out), "--classes", "wall, " + CLASSES]) == 0
    capsys.readouterr()
    assert main(["segment", str(root), *models, "--out", str(out), "--classes", CLASSES, "--background", "wall"]) == 0
    assert "1 segmented" in capsys.readouterr().err


def test_npz_arrays_are_written_one_at_a_time_as_numpy_writes_them(tmp_path):
    """write_npz gives what np.savez gives (the same members, dtypes and values), making each array only when it
    is written and dropping it before the next is made (the full-resolution logits are never held beside the rest),
    and an array given in blocks as numpy writes it whole."""
    import gc
    import weakref

    from trident_core.outputs import Blocks, write_npz

    rng = np.random.default_rng(0)
    arrays = {"logits": rng.random((3, 40, 50), dtype=np.float32), "labels": rng.integers(0, 3, (40, 50)),
              "probs": rng.random((2, 40, 50), dtype=np.float32), "mask": rng.random((4, 5)) < 0.5,
              "scale": np.array(2.5), "fortran": np.asfortranarray(rng.random((6, 7), dtype=np.float32)),
              "strided": rng.integers(0, 9, (8, 10), dtype=np.int32)[:, ::3],
              "class_names": np.array(["sky", "a horse"]), "run_key": np.array("k")}
    alive: list[weakref.ref] = []

    def maker(name: str):
        def make() -> np.ndarray:
            gc.collect()
            assert all(r() is None for r in alive), "an earlier array is still held"
            out = arrays[name].copy(order="K") if arrays[name].flags.c_contiguous or arrays[name].flags.f_contiguous \
                else arrays[name][...]  # (a strided view stays one)
            alive.append(weakref.ref(out))
            return out
        return make

    makers = {name: maker(name) for name in arrays}
    makers["logits"] = lambda: Blocks((3, 40, 50), np.dtype(np.float32), lambda: (arrays["logits"][i:i + 1]
                                                                                   for i in range(3)))
    with open(tmp_path / "ours.npz", "wb") as f:
        write_npz(f, makers)
    np.savez(tmp_path / "numpy.npz", **arrays)
    with np.load(tmp_path / "ours.npz") as ours, np.load(tmp_path / "numpy.npz") as want:
        assert ours.files == want.files
        for name in want.files:
            assert ours[name].dtype == want[name].dtype and np.array_equal(ours[name], want[name])
    with zipfile.ZipFile(tmp_path / "ours.npz") as ours, zipfile.ZipFile(tmp_path / "numpy.npz") as want:
        for name in want.namelist():  # each .npy byte for byte: header (dtype, order, shape) and data
            assert ours.read(name) == want.read(name), name


def test_npz_logits_are_the_whole_upsampling_written_query_by_query(tmp_path):
    """The npz's full-resolution logits, upsampled one query at a time, equal `Segmentation.logits()` (the whole
    [Q, H, W] bilinear upsampling) bit for bit; a block that does not fit its array is an error, not a file."""
    import torch

    from trident_core.classes import parse_classes
    from trident_core.classify import Segmentation
    from trident_core.outputs import Blocks, npz_arrays, write_npz

    grid = torch.randn(4, 9, 13, generator=torch.Generator().manual_seed(5))
    labels = torch.zeros(61, 87, dtype=torch.long)
    seg = Segmentation(labels, torch.rand(4, 61, 87), grid, parse_classes("a, b, c, d"), (61, 87))
    with open(tmp_path / "x.npz", "wb") as f:
        write_npz(f, npz_arrays(seg))
    with np.load(tmp_path / "x.npz") as z:
        assert z["logits"].dtype == np.float32 and np.array_equal(z["logits"], seg.logits().numpy())
    bad = Blocks((3, 2), np.dtype(np.float32), lambda: iter([np.zeros((2, 2), np.float32)]))
    with pytest.raises(ValueError, match="2 rows written"), open(tmp_path / "y.npz", "wb") as f:
        write_npz(f, {"x": lambda: bad})


# ---------------------------------------------------------------------------------- images sharing forwards

def test_images_of_one_size_share_forwards_where_a_gpu_would_and_write_what_one_at_a_time_writes(
        small_ckpts, photo, tmp_path, monkeypatch, capsys):
    """A folder run where images share forwards (a GPU's choice, forced here: 3 per forward): consecutive images
    of one size in one group, a broken image skipped without breaking its group, the same outputs as one image
    at a time (labels, probabilities within float32's rounding), resumed the same way."""
    from trident_core.pipeline import Trident

    root = tmp_path / "in"
    root.mkdir()
    crops = {"a.png": photo[:96, :128], "b.png": photo[40:136, 60:188], "d.png": photo[120:216, 100:228],
             "e.png": photo[100:260, 50:170], "f.png": photo[200:296, 200:328]}
    for name, crop in crops.items():
        Image.fromarray(crop).save(root / name)
    (root / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    args = ["segment", str(root), *_models(small_ckpts)]
    assert main([*args, "--out", str(tmp_path / "one"), "--save-npz", str(tmp_path / "npz_one")]) == 3
    capsys.readouterr()
    groups = []
    group = Trident._segment_group
    monkeypatch.setattr(Trident, "frames_per_forward", lambda self, params, size, free=None: 3)
    monkeypatch.setattr(Trident, "_segment_group", lambda self, imgs, *a: groups.append(
        [img.shape[:2] for img in imgs]) or group(self, imgs, *a))
    shared, npz = tmp_path / "shared", tmp_path / "npz_shared"
    assert main([*args, "--out", str(shared), "--save-npz", str(npz)]) == 3
    err = capsys.readouterr().err
    assert "5 segmented" in err and "1 skipped" in err and sum("c.png" in ln for ln in err.splitlines()) == 2
    assert groups == [[(96, 128)] * 3, [(160, 120)], [(96, 128)]]  # a b d | e | f
    for name in crops:
        assert sorted(p.name for p in (shared / name).iterdir()) == sorted(p.name
                                                                         for p in (tmp_path / "one" / name).iterdir())
        alone, got = _npz(tmp_path / "npz_one" / f"{name}.npz"), _npz(npz / f"{name}.npz")
        assert (alone["labels"] == got["labels"]).mean() >= 0.999
        assert np.allclose(alone["probs"], got["probs"], atol=2e-5)

    groups.clear()
    shutil.rmtree(shared / "d.png")
    assert main([*args, "--out", str(shared), "--save-npz", str(npz)]) == 3
    err = capsys.readouterr().err
    assert "1 segmented" in err and "4 already complete" in err and groups == [[(96, 128)]]


def _fake_jobs(tmp_path: Path, photo: np.ndarray, n: int):
    from trident_core.image_list import ImageJob

    jobs = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(photo[10 * i:10 * i + 32, :48]).save(path)
        jobs.append(ImageJob(path, path.name))
    return jobs


class _Activations:
    """What a shared forward holds on the device (a stand-in)."""


def _groups_of_three(poisoned: int, held: list):
    """A `segment(images)` sharing forwards three images at a time: a group of several runs out of memory holding
    its `_Activations` (a weak reference to them appended to `held`), an image alone is its own result (asserting
    the failed group's activations are gone), the `poisoned` one (its first pixel's value) runs out of memory even
    alone."""
    import itertools
    import weakref

    import torch

    def segment(images):
        it = iter(images)
        while group := list(itertools.islice(it, 3)):
            if len(group) > 1:
                activations = _Activations()
                held.append(weakref.ref(activations))
                raise torch.OutOfMemoryError("CUDA out of memory")
            assert all(ref() is None for ref in held), "a failed forward's activations kept through the retries"
            if group[0][0, 0, 0] == poisoned:
                raise torch.OutOfMemoryError("CUDA out of memory (alone)")
            yield group[0]

    return segment


def test_a_shared_forward_that_fails_is_retried_image_by_image(tmp_path, photo, monkeypatch):
    import trident_core.batch as batch

    jobs = _fake_jobs(tmp_path, photo, 4)
    written, logged = [], []
    monkeypatch.setattr(batch, "_write", lambda seg, image, job, *a: written.append((job.name, seg)))
    poisoned = np.array(Image.open(jobs[1].path))[0, 0, 0]
    assert all(np.array(Image.open(j.path))[0, 0, 0] != poisoned for j in jobs if j is not jobs[1])
    held = []
    counts = batch.run(_groups_of_three(poisoned, held), jobs, batch.Destinations(None, None, False), {}, resume=False,
                       log=logged.append, show_progress=False)
    assert (counts.segmented, counts.unreadable) == (3, 1) and len(held) == 1
    assert [name for name, _ in written] == ["0.png", "2.png", "3.png"]
    for name, seg in written:  # each result written with its own image
        assert np.array_equal(seg, np.array(Image.open(tmp_path / name)))
    assert logged[0].startswith("3 images sharing a forward failed (out of memory")
    assert len(logged) == 2 and logged[1].startswith(f"skipped {jobs[1].path}: out of memory")


def test_a_full_disk_stops_a_shared_run_at_once(tmp_path, photo, monkeypatch):
    import errno

    import trident_core.batch as batch

    jobs = _fake_jobs(tmp_path, photo, 4)
    calls = []

    def full(*a):
        calls.append(a[2].name)
        raise OSError(errno.ENOSPC, "No space left on device")

    def shared(images):  # three images read, then their results handed on one by one
        group = [img for _, img in zip(range(3), images)]
        yield from group

    monkeypatch.setattr(batch, "_write", full)
    with pytest.raises(OSError, match="No space left on device while writing the outputs of 0.png: make room"):
        batch.run(shared, jobs, batch.Destinations(None, None, False), {}, resume=False, show_progress=False)
    assert calls == ["0.png"]  # not retried, no other image tried
