"""`segment` on many images: input forms, per-image outputs equal to single-image runs, resume, interruption,
unreadable files, and torchrun's processes writing the same files as one process."""

from __future__ import annotations

import os
import subprocess
import sys
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
    with pytest.raises(InputError, match="no file matches"):
        gather([str(tmp_path / "*.png")])
    with pytest.raises(InputError, match="no such image file or folder"):
        gather([str(tmp_path / "nope.png")])
    with pytest.raises(InputError, match="image list .* not found"):
        gather([f"@{tmp_path / 'nope.txt'}"])
    assert main(["segment", str(tmp_path / "empty"), "--classes", "a", "--out", str(tmp_path / "o")]) == 2
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
    assert "3 segmented" in err and "1 unreadable" in err
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
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / "a/x.png/trident.json").is_file()
    assert not (out / "b/x.png").exists() and not (out / "y.jpg").exists()
    assert not list(out.rglob(".*"))
    stale = out / "y.jpg"  # an output folder without its completion marker (e.g. an older version's) is redone
    stale.mkdir()
    (stale / "labels.png").write_bytes(b"half")
    assert main(args) == 0
    assert "2 segmented" in capsys.readouterr().err and (stale / "trident.json").is_file()

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
    assert "rank 1/2" in results[2] and "4 segmented" in results[2] and "1 unreadable" in results[2]
    assert _files(tmp_path / "out1") == _files(tmp_path / "out2")
    names = sorted(p.relative_to(tmp_path / "npz1") for p in (tmp_path / "npz1").rglob("*.npz"))
    assert names == sorted(p.relative_to(tmp_path / "npz2") for p in (tmp_path / "npz2").rglob("*.npz"))
    assert len(names) == 4
    for rel in names:
        _assert_same_npz(tmp_path / "npz1" / rel, tmp_path / "npz2" / rel)
