"""The command line writes the files it promises."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from trident_core.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_segment_command(small_ckpts, photo, tmp_path):
    img = tmp_path / "astronaut.png"
    Image.fromarray(photo[:200, :300]).save(img)
    npz = tmp_path / "r.npz"
    rc = main(["segment", str(img), "--classes", "sky, person; astronaut, flag", "--clip", str(small_ckpts["clip"]),
               "--dino", str(small_ckpts["dino"]), "--sam", str(small_ckpts["sam"]), "--refine", "--device", "cpu",
               "--out", str(tmp_path / "out"), "--save-npz", str(npz), "--no-download"])
    assert rc == 0
    out = tmp_path / "out"
    assert {p.name for p in (out / "masks").iterdir()} == {"000_sky.png", "001_person.png", "002_flag.png"}
    assert Image.open(out / "overlay.png").size == (300, 200)
    z = np.load(npz)
    assert z["logits"].shape == (4, 200, 300) and z["probs"].shape == (3, 200, 300)
    assert z["labels"].shape == (200, 300) and list(z["class_names"]) == ["sky", "person", "flag"]
    assert "labels_coarse" in z.files and "probs_coarse" in z.files
    masks = np.stack([np.array(Image.open(out / "masks" / f)) for f in sorted((out / "masks").iterdir())])
    assert ((masks > 0).sum(0) == (z["labels"] >= 0)).all()


def test_segment_then_splice_without_refinement_needs_no_sam(small_ckpts, photo, tmp_path, monkeypatch, capsys):
    """Nothing uses SAM there: no --sam, no SAM file anywhere, downloads off, and it runs; with --refine the
    missing SAM file is the one line of error."""
    monkeypatch.setenv("TRIDENT_CACHE", str(tmp_path / "empty_cache"))
    Image.fromarray(photo[:120, :160]).save(tmp_path / "x.png")
    common = ["segment", str(tmp_path / "x.png"), "--classes", "sky, person", "--clip", str(small_ckpts["clip"]),
              "--dino", str(small_ckpts["dino"]), "--paradigm", "segment_then_splice", "--device", "cpu",
              "--no-download", "--out", str(tmp_path / "out")]
    assert main([*common, "--no-refine"]) == 0
    assert Image.open(tmp_path / "out" / "labels.png").size == (160, 120)
    capsys.readouterr()
    assert main([*common, "--refine"]) == 2
    assert "sam_vit_b_01ec64.pth" in capsys.readouterr().err


def test_missing_model_without_download(tmp_path, capsys, photo):
    Image.fromarray(photo).save(tmp_path / "x.png")
    rc = main(["segment", str(tmp_path / "x.png"), "--classes", "a, b", "--clip", str(tmp_path / "nope.safetensors"),
               "--no-download", "--out", str(tmp_path)])
    assert rc == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_eval_command_on_a_tiny_cityscapes(small_ckpts, photo, tmp_path):
    """`eval` reads the layout, segments every image with the preset's classes and writes mmseg metrics that
    agree with a confusion matrix computed here from the pipeline's own labels."""
    import json
    import warnings

    from trident_core import Trident, get_preset

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(2):
        stem = f"aachen/aachen_{k:06d}_000019"
        img = root / "cityscapes/leftImg8bit/val" / f"{stem}_leftImg8bit.png"
        lab = root / "cityscapes/gtFine/val" / f"{stem}_gtFine_labelTrainIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[k * 100:k * 100 + 96, :192]).save(img)
        Image.fromarray(rng.integers(0, 19, (96, 192)).astype(np.uint8)).save(lab)
        pairs.append((img, lab))
    out = tmp_path / "res.json"
    args = ["eval", "--preset", "city_scapes", "--data-root", str(root), "--out", str(out), "--device", "cpu",
            "--clip", str(small_ckpts["clip"]), "--dino", str(small_ckpts["dino"]), "--sam", str(small_ckpts["sam"]),
            "--no-download"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    res = json.loads(out.read_text())
    tr = Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], device="cpu")
    preset = get_preset("city_scapes")
    conf = np.zeros((19, 19), np.int64)
    for img, lab in pairs:
        pred = tr.segment(np.array(Image.open(img)), preset.classes(), preset.params).labels.numpy()
        gt = np.array(Image.open(lab))
        np.add.at(conf, (gt.reshape(-1), pred.reshape(-1)), 1)
    iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    assert res["num_images"] == 2
    assert abs(res["mIoU"] - round(100 * np.nanmean(iou), 2)) < 0.011
    assert abs(res["aAcc"] - round(100 * np.diag(conf).sum() / conf.sum(), 2)) < 0.011


def test_the_command_flushes_its_lines_and_keeps_its_exit_status(tmp_path):
    """`python -m trident_core` ends without the interpreter's teardown: what it printed still arrives, and its
    status is main()'s (here 2: an error, one line)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "trident_core", "segment", str(tmp_path / "missing.png"), "--out",
                           str(tmp_path / "out"), "--no-download"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.png" in done.stderr


def test_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    from trident_core import cli

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_segment", interrupted)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["segment", str(tmp_path / "x.png"), "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted") and "again" in err[0]


def test_option_values_ignore_case_and_a_wrong_one_is_one_line(tmp_path, monkeypatch, capsys):
    """--precision BF16, --preset VOC21 and the like mean their lower-case choices; a value that is no choice, an
    unknown option or command is one line naming it (argparse's usage block buried it) and exit status 2."""
    import pytest

    import trident_core.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_segment", lambda args: seen.update(vars(args)) or 0)
    assert main(["segment", "x.png", "--out", str(tmp_path), "--precision", "BF16", "--preset", "VOC21",
                 "--paradigm", "Segment_Then_Splice", "--correlation", "AFFINITY", "--mask-prompt-mode",
                 "Batched"]) == 0
    assert (seen["precision"], seen["preset"], seen["paradigm"], seen["correlation"], seen["mask_prompt_mode"]) == (
        "bf16", "voc21", "segment_then_splice", "affinity", "batched")
    for argv, names in ((["segment", "x.png", "--out", "o", "--precision", "bf17"], "'bf17'"),
                        (["segment", "x.png", "--out", "o", "--precison", "bf16"], "--precison"),
                        (["segmnt", "x.png"], "'segmnt'"),
                        (["eval", "--preset", "voc", "--data-root", "d"], "'voc'")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1, err
        assert names in err[0] and "error" in err[0] and "-h` lists the options" in err[0]


def test_segment_shows_the_text_encodings_progress_once_per_step_and_not_from_the_cache(small_ckpts, photo,
                                                                                         tmp_path, monkeypatch,
                                                                                         capsys):
    """Encoding a long class list takes minutes on a CPU: `segment` said nothing meanwhile (only `eval` did, with
    a line per batch, each step repeated). Each step is one line now, and a cached list shows none."""
    import trident_core.text as text

    monkeypatch.setenv("TRIDENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text, "PROMPT_BATCH", 80)  # one name per batch: many batches per 10 % step
    Image.fromarray(photo[:64, :64]).save(tmp_path / "x.png")
    names = [f"thing {i}" for i in range(25)]
    argv = ["segment", str(tmp_path / "x.png"), "--classes", ", ".join(names), "--clip", str(small_ckpts["clip"]),
            "--dino", str(small_ckpts["dino"]), "--sam", str(small_ckpts["sam"]), "--no-refine", "--device", "cpu",
            "--no-download"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    steps = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines() if "class names" in line]
    assert steps == [f"text {p}% of 25 class names" for p in range(0, 101, 10)]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert "class names" not in capsys.readouterr().err
